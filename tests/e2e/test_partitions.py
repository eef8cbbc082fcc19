"""Day partitions of jobs and job_events (common.partitions, common.retention_days) on
real Postgres and S3: where a job lands, that a lookup by id reads one partition, that a
day is made over rows already in the default, that upkeep is safe to run twice and at
once, and that retention drops a finished day whole and keeps the others."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from hepato.common import ids, job_state_counts, partitions, retention
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.worker.recovery import Recovery
from tests.conftest import SAMPLES

PNG = sorted(SAMPLES.glob("synthetic_*.png"))[0]
TODAY = datetime.now(UTC).date()
JOB = (
    "INSERT INTO jobs (id, tenant, filename, object_key, image_format, size_bytes, width,"
    " height, model, task, priority, state, attempts, max_attempts) VALUES (:id, 'lab', 'f',"
    " 'k', 'png', 1, 1, 1, 'm', 'detect', 'routine', 'pending', 0, 3)"
)


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return get_engine(settings.database_url)


@pytest.fixture
def days(engine: Engine) -> Iterator[Callable[..., None]]:
    """Make partitions of given days; whatever is left of them is dropped after the test
    (the test database is shared: a day left empty and old would be another test's drop)."""
    made: list[date] = []

    def make(*wanted: date) -> None:
        for day in wanted:
            with engine.begin() as conn:
                partitions.create_day(conn, day)
            made.append(day)

    yield make
    with engine.begin() as conn:
        attached = set(partitions.attached_days(conn))
        for day in made:
            if day in attached:
                conn.execute(text(f"DROP TABLE {partitions.events_partition(day)}"))
                conn.execute(text(f"DROP TABLE {partitions.jobs_partition(day)}"))


def partition_of(engine: Engine, table: str, key: str, value: uuid.UUID) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    f"SELECT c.relname FROM {table} t JOIN pg_class c ON c.oid = t.tableoid"
                    f" WHERE t.{key} = :v"
                ),
                {"v": value},
            ).scalars()
        )


def v4_in(day: date) -> uuid.UUID:
    """An old (v4, random) id whose first 48 bits happen to fall in ``day``."""
    ms = int(partitions.day_start(day).timestamp() * 1000) + 12345
    return uuid.UUID(int=(ms << 80) | (uuid.uuid4().int & ((1 << 80) - 1)))


def assert_counts_right(engine: Engine) -> None:
    with engine.connect() as conn:
        counted = {k: n for k, n in job_state_counts.totals(conn).items() if n}
        truth = conn.execute(text("SELECT model, state, count(*) FROM jobs GROUP BY 1, 2"))
        assert counted == {(m, s): n for m, s, n in truth}


def test_a_new_job_lands_in_its_day_and_an_old_id_in_the_default(engine: Engine) -> None:
    new, old_low, old_high = ids.new_job_id(), v4_in(date(2030, 5, 5)), uuid.uuid4()
    old_high = uuid.UUID(int=old_high.int | (0xF << 124))  # above 2100's bound
    with engine.begin() as conn:
        for job in (new, old_low, old_high):
            conn.execute(text(JOB), {"id": job})
            conn.execute(
                text("INSERT INTO job_events (job_id, tenant, state) VALUES (:id, 'lab', 'x')"),
                {"id": job},
            )
    # The id's own day, not TODAY (read at collection): a run may cross midnight.
    made = ids.made_at(new)
    assert made is not None
    day = made.date()
    assert partition_of(engine, "jobs", "id", new) == [f"jobs_p{day:%Y%m%d}"]
    assert partition_of(engine, "job_events", "job_id", new) == [f"job_events_p{day:%Y%m%d}"]
    assert partition_of(engine, "jobs", "id", old_low) == ["jobs_default"]
    assert partition_of(engine, "job_events", "job_id", old_low) == ["job_events_default"]
    assert partition_of(engine, "jobs", "id", old_high) == ["jobs_legacy"]
    assert ids.made_at(new) is not None and ids.made_at(old_low) is None
    assert_counts_right(engine)  # the counts' triggers fire on the partitioned parent


def relations(plan: Any) -> list[str]:
    found: list[str] = []
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.append(plan["Relation Name"])
        for value in plan.values():
            found += relations(value)
    elif isinstance(plan, list):
        for value in plan:
            found += relations(value)
    return found


@pytest.mark.parametrize("made", ["new", "old"])
def test_a_lookup_by_id_reads_one_partition(engine: Engine, made: str) -> None:
    job = ids.new_job_id() if made == "new" else uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(text(JOB), {"id": job})
        for sql in (
            "SELECT * FROM jobs WHERE id = :id",
            "SELECT * FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))",
            "UPDATE jobs SET state = 'processing' WHERE id = :id",
            "SELECT * FROM job_events WHERE job_id = :id ORDER BY xid, id",
        ):
            plan = conn.execute(
                text("EXPLAIN (FORMAT JSON) " + sql), {"id": job, "ids": [job]}
            ).scalar_one()
            # The parent is named as the UPDATE's target; one partition is read.
            read = set(relations(plan)) - {"jobs", "job_events"}
            assert len(read) == 1, (sql, plan)


def test_a_day_is_made_over_old_rows_of_it_which_move_in(
    engine: Engine, settings: Settings, days: Callable[..., None]
) -> None:
    day = TODAY + timedelta(days=100)
    old = v4_in(day)
    with engine.begin() as conn:
        conn.execute(text(JOB), {"id": old})
        for state in ("pending", "processing"):
            conn.execute(
                text("INSERT INTO job_events (job_id, tenant, state) VALUES (:id, 'lab', :s)"),
                {"id": old, "s": state},
            )
    assert partition_of(engine, "jobs", "id", old) == ["jobs_default"]

    days(day)

    assert partition_of(engine, "jobs", "id", old) == [f"jobs_p{day:%Y%m%d}"]
    assert partition_of(engine, "job_events", "job_id", old) == [f"job_events_p{day:%Y%m%d}"] * 2
    assert_counts_right(engine)  # moved, not made: counted once
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": old})
    assert partition_of(engine, "job_events", "job_id", old) == []


def test_upkeep_makes_each_day_once_run_twice_or_at_once(
    engine: Engine, days: Callable[..., None]
) -> None:
    start = TODAY + timedelta(days=200)
    wanted = partitions.wanted_days(3, start)
    results: list[list[date] | None] = []
    barrier = threading.Barrier(2)

    def upkeep() -> None:
        barrier.wait()
        results.append(partitions.ensure(engine, 3, today=start))

    try:
        threads = [threading.Thread(target=upkeep) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        made = [d for r in results if r for d in r]
        # One made them; the other found the lock taken (None) or nothing left ([]).
        assert sorted(made) == wanted and len(results) == 2
        with engine.connect() as conn:
            assert set(wanted) <= set(partitions.attached_days(conn))
        assert partitions.ensure(engine, 3, today=start) == []
        with engine.connect() as holder:
            holder.execute(
                text("SELECT pg_advisory_lock(:c, :i)"),
                {"c": partitions.LOCK_CLASS, "i": partitions.LOCK_ID},
            )
            assert partitions.ensure(engine, 3, today=start) is None
            holder.execute(
                text("SELECT pg_advisory_unlock(:c, :i)"),
                {"c": partitions.LOCK_CLASS, "i": partitions.LOCK_ID},
            )
    finally:
        days(*wanted)  # for the cleanup: each is there already, and left as it is


def submit_on(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, day: date, n: int
) -> tuple[str, list[str]]:
    """A batch of ``n`` images submitted (ids made) at noon of ``day``."""
    noon = int((partitions.day_start(day) + timedelta(hours=12)).timestamp() * 1000)
    monkeypatch.setattr(ids, "_clock_ms", lambda: noon)
    files = [("files", (f"{i}.png", PNG.read_bytes(), "image/png")) for i in range(n)]
    response = client.post("/v1/batches", files=files)
    assert response.status_code == 202, response.text
    body = response.json()
    monkeypatch.undo()
    return body["batch_id"], [j["job_id"] for j in body["jobs"]]


def finish(engine: Engine, job_ids: list[str], ago: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET state = 'done', finished_at = now() - CAST(:ago AS interval),"
                " enqueued_at = now() - CAST(:ago AS interval) - interval '1 minute'"
                " WHERE id = ANY(:ids)"
            ),
            {"ago": ago, "ids": [uuid.UUID(i) for i in job_ids]},
        )


def attached(engine: Engine, day: date) -> bool:
    with engine.connect() as conn:
        return day in partitions.attached_days(conn)


def test_retention_drops_a_finished_day_whole_and_keeps_the_others(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    days: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = ObjectStore(settings)
    gone_day, pending_day, late_day = (TODAY - timedelta(days=d) for d in (40, 39, 38))
    days(gone_day, pending_day, late_day)
    gone_batch, gone = submit_on(client, monkeypatch, gone_day, 3)
    _, pending = submit_on(client, monkeypatch, pending_day, 2)
    _, late = submit_on(client, monkeypatch, late_day, 2)
    finish(engine, gone + pending[:1] + late[:1], "30 days")
    finish(engine, late[1:], "1 day")  # finished within the period: its day waits
    with engine.connect() as conn:
        keys = dict(conn.execute(text("SELECT id::text, object_key FROM jobs")).all())
        events = conn.execute(
            text(f"SELECT count(*) FROM {partitions.events_partition(gone_day)}")
        ).scalar_one()
    assert events == 3 and all(store.exists(k) for k in keys.values())

    done = retention.run(engine, store, 7.0)

    # The finished day: both partitions dropped, its batch and objects deleted.
    assert not attached(engine, gone_day)
    with engine.connect() as conn:
        for table in (partitions.jobs_partition, partitions.events_partition):
            name = table(gone_day)
            assert conn.execute(text("SELECT to_regclass(:t)"), {"t": name}).scalar() is None
        left = conn.execute(text("SELECT count(*) FROM batches WHERE id = :b"), {"b": gone_batch})
        assert left.scalar_one() == 0
    assert not any(store.exists(keys[j]) for j in gone)
    # The day with a pending job stays; its finished job went by the chunked deletes.
    assert attached(engine, pending_day)
    assert [partition_of(engine, "jobs", "id", uuid.UUID(j)) for j in pending] == [
        [],
        [f"jobs_p{pending_day:%Y%m%d}"],
    ]
    # The day with a job finished a day ago waits whole: nothing of it is deleted.
    assert attached(engine, late_day)
    assert all(partition_of(engine, "jobs", "id", uuid.UUID(j)) for j in late)
    assert all(store.exists(keys[j]) for j in pending[1:] + late)
    assert (done.days, done.jobs, done.events, done.batches) == (1, 3 + 1, 3 + 1, 1)
    assert done.objects == 4 and done.objects_failed == 0
    assert_counts_right(engine)
    assert retention.run(engine, store, 7.0).jobs == 0


def test_the_sweeper_keeps_the_days_ahead_made(
    engine: Engine, settings: Settings, days: Callable[..., None]
) -> None:
    ahead = settings.partition_days_ahead + 1
    day = TODAY + timedelta(days=ahead)
    recovery = Recovery(
        settings.model_copy(update={"partition_days_ahead": ahead}),
        engine,
        redis.Redis.from_url(settings.redis_url),
        "partitions-test",
        [settings.default_model],
        threading.Event(),
    )
    try:
        recovery.upkeep_once()
        assert attached(engine, day)
    finally:
        days(day)  # for the cleanup
