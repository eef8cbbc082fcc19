"""The README's "a stage that fails on the whole batch hands it back": the worker's write
stage raises mid-run, once before its transaction (nothing written: the batch goes back
to the queue and runs again) and once after it committed (the results stand: handing the
batch back must not undo them or run them twice). Either way nothing is lost and no job
is completed twice, and the worker carries on with the next batches."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hepato.common.settings import Settings
from hepato.worker.backends.base import Model
from tests.chaos.conftest import ids, judge
from tests.e2e.test_pipeline import db_jobs, submit, thirty_two

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("when", ["before", "after"])
def test_the_write_stage_dying_mid_batch_loses_nothing(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    completions,
    when: str,
) -> None:
    from hepato.worker.runner import Worker

    accepted = submit(client, thirty_two()[:16])
    fast = settings.model_copy(update={"max_batch_size": 4, "retry_backoff_s": 0.05})
    worker = Worker(fast, models, burst=True)
    write = worker._write
    died_with: list[uuid.UUID] = []

    def dying_write(batch: Any) -> None:
        if died_with:
            return write(batch)
        died_with.extend(batch.ids)
        if when == "after":
            write(batch)  # committed: results, done
        raise RuntimeError(f"write stage died {when} its transaction")

    worker._write = dying_write  # type: ignore[method-assign]
    worker.run(install_signals=False)

    jobs = {j.id: j for j in db_jobs(settings)}
    assert len(died_with) == 4
    assert all(j.state == "done" for j in jobs.values()), Counter(j.state for j in jobs.values())
    others = [j for i, j in jobs.items() if i not in died_with]
    assert all(j.attempts == 1 for j in others), "the rest of the run went on as usual"
    # Before the commit the batch ran again; after it, its results stood.
    again = 2 if when == "before" else 1
    assert [jobs[i].attempts for i in died_with] == [again] * 4
    judge(
        settings,
        f"the write stage raises {when} its transaction, one batch of 4 among 16",
        ids(accepted),
        completions,
        in_flight=4,
    )
