"""Chaos, culprits (issue 12): one poison image in a microbatch of 8 that makes the model
call hang, or kills the worker process in it (a segfault, the OOM killer), fails only its
own job. Neither fault names its culprit, so every job of the microbatch is tried again;
a job tried before then runs in a microbatch of its own (common.claim), and the seven
others finish on their second attempt."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from hepato.common.settings import Settings
from hepato.worker.backends.base import Model
from tests.chaos import poison
from tests.chaos.conftest import Spawned, ids, judge, ledger, wait_for
from tests.e2e.test_pipeline import db_jobs

pytestmark = pytest.mark.slow

# One microbatch: the 8 ids are queued before the worker starts, and it takes them all.
ONE_BATCH = {"max_batch_size": 8}


def eight_with_one_poison(client: TestClient, pixel: tuple[int, int, int]) -> list[str]:
    files = [("files", (f"ok{i}.png", poison.png(), "image/png")) for i in range(7)]
    files.insert(3, ("files", ("bad.png", poison.png(pixel=pixel), "image/png")))
    response = client.post("/v1/batches", files=files)
    assert response.status_code == 202, response.text
    return ids(response.json())


def assert_only_the_culprit_failed(settings: Settings) -> None:
    jobs = {j.filename: j for j in db_jobs(settings)}
    bad = jobs.pop("bad.png")
    assert bad.state == "failed" and bad.attempts == settings.max_attempts, bad
    assert all(j.state == "done" for j in jobs.values()), [
        (j.filename, j.state) for j in jobs.values()
    ]
    # The microbatch they shared with the culprit, then one of their own.
    assert max(j.attempts for j in jobs.values()) == 2


def test_a_hang_on_one_image_of_eight_fails_only_its_job(
    settings: Settings, client: TestClient, models: dict[str, Model]
) -> None:
    from hepato.worker.runner import Worker

    accepted = eight_with_one_poison(client, poison.HANG_PIXEL)
    poisoned = {name: poison.PoisonedModel(m) for name, m in models.items()}
    hurried = settings.model_copy(update={**ONE_BATCH, "model_timeout_s": 1.0})
    with ledger(settings) as read:
        Worker(hurried, poisoned, burst=True).run(install_signals=False)  # type: ignore[arg-type]
        judge(settings, "model call hangs on 1 image of a microbatch of 8", accepted, read, 8)
    assert_only_the_culprit_failed(settings)
    assert "the model call took longer than 1s" in (
        next(j for j in db_jobs(settings) if j.filename == "bad.png").error or ""
    )


def test_a_process_death_on_one_image_of_eight_fails_only_its_job(
    settings: Settings, client: TestClient, spawn_worker: Callable[..., Spawned]
) -> None:
    accepted = eight_with_one_poison(client, poison.DEATH_PIXEL)
    env = {"HEPATO_MAX_BATCH_SIZE": "8", "HEPATO_MAX_WAIT_MS": "200"}
    workers = [spawn_worker("dies-0", module="tests.chaos.die_on_poison", **env)]

    def finished() -> bool:
        # A supervisor's job: start a new worker whenever the last one died.
        if workers[-1].proc.poll() is not None:
            workers.append(
                spawn_worker(f"dies-{len(workers)}", module="tests.chaos.die_on_poison", **env)
            )
        return all(j.state in ("done", "failed") for j in db_jobs(settings))

    with ledger(settings) as read:
        wait_for("every job done or failed", finished, timeout_s=120, every_s=0.2)
        deaths = sum(w.proc.poll() is not None for w in workers)
        judge(
            settings,
            "worker killed by 1 image of a microbatch of 8",
            accepted,
            read,
            8,
            deaths=deaths,
        )
    assert_only_the_culprit_failed(settings)
    assert deaths == settings.max_attempts, [w.log_text() for w in workers]
