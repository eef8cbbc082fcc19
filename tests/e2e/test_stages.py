"""The worker's stages overlap: while one microbatch is on the model, the next is claimed,
downloaded and decoded. Observed through Postgres, not through timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hepato.common.constants import JobState
from hepato.common.settings import Settings
from hepato.worker.backends.base import Model
from tests.e2e.test_pipeline import db_jobs, submit, thirty_two

pytestmark = pytest.mark.slow


class Watching:
    """The real model, which before its first call waits (up to ``patience_s``) to see
    the worker holding more jobs than that call carries."""

    def __init__(self, model: Model, settings: Settings, patience_s: float) -> None:
        self.model = model
        self.manifest = model.manifest
        self.settings = settings
        self.patience_s = patience_s
        self.held_during_first_call = 0
        self.calls = 0

    def predict(self, images: list[np.ndarray]) -> object:
        self.calls += 1
        deadline = time.monotonic() + self.patience_s
        while self.calls == 1:
            self.held_during_first_call = sum(
                j.state == JobState.processing for j in db_jobs(self.settings)
            )
            if self.held_during_first_call > len(images) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return self.model.predict(images)


def run_watched(
    settings: Settings, models: dict[str, Model], prefetch: int, patience_s: float
) -> tuple[Watching, object]:
    from hepato.worker.runner import Worker

    name = settings.default_model
    watched = Watching(models[name], settings, patience_s)
    # No warm-up: the first call watched is the first microbatch's.
    tuned = settings.model_copy(
        update={"max_batch_size": 4, "prefetch_batches": prefetch, "model_warmup": False}
    )
    worker = Worker(tuned, {name: watched}, burst=True)  # type: ignore[dict-item]
    worker.run(install_signals=False)
    return watched, worker


def test_the_next_batch_is_claimed_and_prepared_while_one_is_on_the_model(
    client: TestClient, settings: Settings, models: dict[str, Model]
) -> None:
    submit(client, thirty_two()[:16])
    watched, _ = run_watched(settings, models, prefetch=1, patience_s=30)
    assert watched.held_during_first_call == 8, "batch 1 on the model, batch 2 claimed"
    assert {j.state for j in db_jobs(settings)} == {"done"}


def test_prefetch_zero_runs_the_stages_one_after_another(
    client: TestClient, settings: Settings, models: dict[str, Model]
) -> None:
    submit(client, thirty_two()[:16])
    watched, _ = run_watched(settings, models, prefetch=0, patience_s=1)
    assert watched.held_during_first_call == 4, "nothing claimed beyond the batch in hand"
    assert {j.state for j in db_jobs(settings)} == {"done"}


def test_prefetched_batches_are_done_in_order_with_the_lease_kept(
    client: TestClient, settings: Settings, run_worker: Callable[..., object]
) -> None:
    # Leases of 4 s renewed every second, with batches waiting their turn in the worker:
    # no job may be reclaimed by the sweeper while it sits prefetched.
    submit(client, thirty_two())
    run_worker(max_batch_size=4, prefetch_batches=2)
    jobs = db_jobs(settings)
    assert {j.state for j in jobs} == {"done"}
    assert all(j.attempts == 1 for j in jobs), "no lease ran out"


class Faulty:
    """The real (phased) detector with one phase that always raises. ``predict`` works,
    as it would for a poison input that only some batch shapes trip."""

    def __init__(self, model: Model, phase: str) -> None:
        self.model: Any = model
        self.manifest = model.manifest
        self.phase = phase

    def predict(self, images: list[np.ndarray]) -> object:
        return self.model.predict(images)

    def prepare(self, images: list[np.ndarray]) -> object:
        self._maybe_fail("prepare")
        return self.model.prepare(images)

    def run(self, prepared: object) -> object:
        self._maybe_fail("run")
        return self.model.run(prepared)

    def finish(self, prepared: object, raws: object) -> object:
        self._maybe_fail("finish")
        return self.model.finish(prepared, raws)

    def _maybe_fail(self, phase: str) -> None:
        if phase == self.phase:
            raise RuntimeError(f"{phase} exploded")


@pytest.mark.parametrize("phase", ["prepare", "run", "finish"])
def test_a_phase_that_raises_falls_back_to_predict_and_loses_no_attempt(
    client: TestClient, settings: Settings, models: dict[str, Model], phase: str
) -> None:
    from hepato.worker.inference import phases
    from hepato.worker.runner import Worker

    name = settings.default_model
    assert phases(models[name]), "the default detector runs in phases"
    submit(client, thirty_two()[:6])
    worker = Worker(settings, {name: Faulty(models[name], phase)}, burst=True)  # type: ignore[dict-item]
    worker.run(install_signals=False)
    jobs = db_jobs(settings)
    assert {(j.state, j.attempts) for j in jobs} == {("done", 1)}
