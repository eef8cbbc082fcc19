"""The README's "urgent jobs are taken before routine ones of every model": one worker
serving two models takes model B's urgent jobs before model A's routine backlog, though
they were submitted after it and A's queue is the older."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from hepato.common.settings import Settings
from tests.chaos.conftest import ids, judge
from tests.e2e.test_pipeline import db_jobs, submit, thirty_two

pytestmark = pytest.mark.slow

ROUTINE_MODEL, URGENT_MODEL = "hepato-yolov8n", "null"


def test_urgent_jobs_of_one_model_overtake_routine_jobs_of_another(
    client: TestClient, settings: Settings, completions
) -> None:
    from hepato.worker.backends.base import load_models
    from hepato.worker.runner import Worker

    routine = submit(client, thirty_two() + thirty_two()[:16], model=ROUTINE_MODEL)
    urgent = submit(client, thirty_two()[:8], model=URGENT_MODEL, priority="urgent")
    both = load_models(settings, [ROUTINE_MODEL, URGENT_MODEL])
    worker = Worker(settings.model_copy(update={"max_batch_size": 4}), both, burst=True)
    worker.run(install_signals=False)

    by_id = {str(j.id): j for j in db_jobs(settings)}
    urgent_jobs = [by_id[j["job_id"]] for j in urgent["jobs"]]
    routine_jobs = [by_id[j["job_id"]] for j in routine["jobs"]]
    assert all(j.state == "done" for j in by_id.values())
    assert {j.model for j in urgent_jobs} == {URGENT_MODEL}
    assert {j.model for j in routine_jobs} == {ROUTINE_MODEL}
    # Submitted last, for the other model, claimed first: every urgent job was claimed
    # before any routine one.
    last_urgent = max(j.started_at for j in urgent_jobs)  # type: ignore[type-var]
    first_routine = min(j.started_at for j in routine_jobs)  # type: ignore[type-var]
    assert last_urgent <= first_routine, (last_urgent, first_routine)
    judge(
        settings,
        "8 urgent jobs of model B submitted behind 48 routine of model A, one worker for both",
        ids(routine, urgent),
        completions,
    )
