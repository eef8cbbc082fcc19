"""Tenants share a model's queue fairly (issue 12): each holds its own share of the
queue bound, the bound holds under concurrent submissions, and a worker takes turns
between the tenants with jobs waiting, so one tenant's backlog does not starve another's
few images."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from hepato.common import room
from hepato.common.settings import Settings
from tests.chaos.conftest import ids, judge
from tests.chaos.test_overload import objects
from tests.e2e.test_pipeline import db_jobs, thirty_two, upload
from tests.security import auth

pytestmark = pytest.mark.slow

# A gateway that requires keys: tenants are told apart by them.
engine, make_client, key_of = auth.engine, auth.make_client, auth.key_of
Post = Callable[..., Any]


def poster(make_client: auth.MakeClient, key: str, **overrides: Any) -> Post:
    client = make_client(**overrides)
    return lambda n, **form: client.post(
        "/v1/batches", files=upload(thirty_two()[:n]), data=form, headers=auth.bearer(key)
    )


def test_a_tenants_backlog_does_not_starve_another(
    settings: Settings,
    make_client: auth.MakeClient,
    key_of: Callable[[str], str],
    run_worker: Callable[..., object],
    completions: Any,
) -> None:
    bulk, small = poster(make_client, key_of("bulk")), poster(make_client, key_of("small"))
    backlog = [bulk(32).json(), bulk(32).json()]
    few = small(4).json()
    run_worker(max_batch_size=4)
    jobs = {str(j.id): j for j in db_jobs(settings)}
    assert {j.state for j in jobs.values()} == {"done"}
    small_started = max(jobs[i].started_at for i in ids(few))  # type: ignore[type-var]
    bulk_before = sum(jobs[i].started_at < small_started for i in ids(*backlog))  # type: ignore[operator]
    # Queued after 64 of another tenant's, yet claimed within the first two microbatches.
    assert bulk_before <= 4, f"{bulk_before} of the backlog ran before the 4 small jobs"
    judge(
        settings,
        "a tenant's 4 jobs queued behind another's 64: claimed in the 2nd microbatch of 4",
        ids(*backlog, few),
        completions,
        ran_before=bulk_before,
    )


def test_each_tenant_holds_its_own_share_of_the_queue(
    settings: Settings, make_client: auth.MakeClient, key_of: Callable[[str], str]
) -> None:
    bounds = {"max_queued_per_model": 100, "max_queued_per_tenant": 5}
    a, b = poster(make_client, key_of("a"), **bounds), poster(make_client, key_of("b"), **bounds)
    assert a(4).status_code == 202
    refused = a(3)
    assert refused.status_code == 429, refused.text
    assert "tenant 'a' holds 4 of its share of 5 pending jobs" in refused.json()["detail"]
    assert b(3).status_code == 202, "another tenant's share is its own"
    assert len(db_jobs(settings)) == 7


def test_the_bound_holds_under_concurrent_submissions(
    settings: Settings,
    make_client: auth.MakeClient,
    key_of: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four requests of 4 files each all pass the up-front check before any of them
    commits (a barrier holds them there); together they would put 16 jobs in a queue
    bounded at 8. The check in the inserting transaction keeps it at 8, and a request it
    refuses keeps none of its stored files."""
    post = poster(make_client, key_of("racer"), max_queued_per_model=8)
    stored = objects(settings)
    together = threading.Barrier(4, timeout=30)
    checked = room.check_room

    def check_then_wait(*args: Any) -> None:
        checked(*args)
        together.wait()

    monkeypatch.setattr(room, "check_room", check_then_wait)
    answers: list[Any] = []
    threads = [threading.Thread(target=lambda: answers.append(post(4))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    codes = sorted(a.status_code for a in answers)
    assert codes == [202, 202, 429, 429], codes
    assert len(db_jobs(settings)) == 8
    assert objects(settings) == stored + 8, "a refused request keeps none of its files"
