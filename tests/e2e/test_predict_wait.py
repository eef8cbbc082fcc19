"""/v1/predict's wait: the caller listens for its job before the job exists, and is
answered by the worker's wake-up, which carries the finished row (no read at all); a
wake-up without it costs one read, after the job finished (not one per event, nor one
up front). Real Postgres, Redis and S3, a worker in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from hepato.common.settings import Settings
from hepato.gateway import finish_watch
from hepato.worker.backends.base import Model
from tests.conftest import SAMPLES
from tests.e2e.conftest import images

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sent", [True, False], ids=["answer sent", "answer too long"])
def test_a_predict_caller_is_answered_by_the_wakeup_or_reads_once_it_has_finished(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    monkeypatch: pytest.MonkeyPatch,
    sent: bool,
) -> None:
    from hepato.common import event_log
    from hepato.worker.runner import Worker

    if not sent:
        monkeypatch.setattr(event_log, "ANSWER_MAX_CHARS", 10)

    # No periodic re-read within the test: every read comes from a wake-up.
    state = client.app.state  # type: ignore[attr-defined]
    watch = finish_watch.FinishWatch(state.finish_watch.engine, state.finish_watch.hub, 600.0)
    client.portal.call(watch.start)  # type: ignore[union-attr]
    # The hub connects in the background, and on connecting wakes every listener (what
    # was published before it stood is lost): a caller that listened before that would
    # see one read more, by design. Start once it stands.
    deadline = time.monotonic() + 10
    while watch.hub._pubsub is None:
        assert time.monotonic() < deadline, "the wake-up hub never connected"
        time.sleep(0.01)
    client.portal.call(asyncio.sleep, 0)  # type: ignore[union-attr]  # its connect's end
    state.finish_watch = watch
    reads: list[tuple[list[uuid.UUID], list[str]]] = []
    waiting: list[float | None] = []  # the gauge of waiting callers, at each read
    real_read = finish_watch._read

    def counted(engine: Any, ids: list[uuid.UUID]) -> Any:
        found = real_read(engine, ids)
        reads.append((ids, [found.states[i] for i in ids if i in found.states]))
        waiting.append(REGISTRY.get_sample_value("hepato_predict_waiting"))
        return found

    monkeypatch.setattr(finish_watch, "_read", counted)
    worker = Worker(settings, models)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    thread.start()
    try:
        path = images(SAMPLES, "synthetic_*.png")[0]
        for _ in range(3):
            reads.clear()
            response = client.post("/v1/detect", files={"file": ("a.png", path.read_bytes())})
            assert response.status_code == 200, response.text
            answer = response.json()
            job_id = uuid.UUID(answer["job_id"])
            if sent:
                assert reads == [], "answered from the wake-up"
            else:
                assert reads == [([job_id], ["done"])], "one read, after the job finished"
                assert waiting[-1] == 1, "the caller counted as waiting while it waited"
            assert REGISTRY.get_sample_value("hepato_predict_waiting") == 0
            # Either way the answer is the committed row's.
            row = client.get(f"/v1/jobs/{job_id}").json()
            for key in ("result", "model", "task", "width", "height", "batch_size"):
                assert answer[key] == row[key], key
            for key in ("queue_wait_ms", "inference_ms"):
                assert answer[key] == row[key], key
            shared = set(answer["stages_ms"]) - {"other"}
            assert {k: answer["stages_ms"][k] for k in shared} == {
                k: row["stages_ms"][k] for k in shared
            }
    finally:
        worker.stopping.set()
        thread.join(timeout=30)
        client.portal.call(watch.close)  # type: ignore[union-attr]


def test_a_read_before_the_job_exists_does_not_end_the_wait(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller is watched from before its job is created: a re-read in between finds
    no row, which then means 'not yet', not 'gone' (a 404 for an accepted job)."""
    from hepato.common import jobs
    from hepato.worker.runner import Worker

    watch = client.app.state.finish_watch  # type: ignore[attr-defined]
    watch.reread_s = 0.05
    real_create = jobs.create
    rounds_before: list[int] = []

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        started = watch_rounds()
        # Wait (in the gateway's worker thread) until the watch has read the waiter's
        # job at least once while it did not exist.
        deadline = time.monotonic() + 10
        while watch_rounds() < started + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        rounds_before.append(watch_rounds() - started)
        return real_create(*args, **kwargs)

    reads: list[int] = []
    real_read = finish_watch._read

    def counted(engine: Any, ids: list[uuid.UUID]) -> Any:
        reads.append(len(ids))
        return real_read(engine, ids)

    def watch_rounds() -> int:
        return len(reads)

    monkeypatch.setattr(finish_watch, "_read", counted)
    monkeypatch.setattr(jobs, "create", slow_create)
    worker = Worker(settings, models)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    thread.start()
    try:
        path = images(SAMPLES, "synthetic_*.png")[0]
        response = client.post("/v1/detect", files={"file": ("a.png", path.read_bytes())})
        assert rounds_before and rounds_before[0] >= 2, "read while the job did not exist"
        assert response.status_code == 200, response.text
        assert response.json()["result"]["boxes"]
    finally:
        worker.stopping.set()
        thread.join(timeout=30)


@pytest.mark.parametrize("waiting", [2, finish_watch.WHOLE_ROWS_UP_TO + 5])
def test_a_round_reads_few_waiters_in_one_statement_and_many_in_two(
    settings: Settings, waiting: int
) -> None:
    """The states of every due job, and the rows of the finished ones only; a job not
    yet created has no state. A few waiters are one statement."""
    from sqlalchemy import Connection, event, update

    from hepato.common.db import get_engine
    from hepato.common.tables import Job
    from tests.e2e.test_event_order import make_batch

    engine = get_engine(settings.database_url)
    ids = make_batch(engine, waiting - 1)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[0]).values(state="done"))
    not_yet = uuid.uuid4()
    statements: list[str] = []

    def seen(conn: Connection, cursor: object, sql: str, *args: object) -> None:
        statements.append(sql)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        read = finish_watch._read(engine, [*ids, not_yet])
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert read.states == {ids[0]: "done", **dict.fromkeys(ids[1:], "pending")}
    assert list(read.finished) == [ids[0]] and read.finished[ids[0]].filename == "a.png"
    assert len(statements) == (1 if waiting <= finish_watch.WHOLE_ROWS_UP_TO else 2)
