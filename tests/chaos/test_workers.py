"""Chaos, workers (issue 4, faults 1-4): workers killed, stopped and frozen while they
hold jobs, on real Postgres, Redis and S3. Every case ends the same way: every accepted
job ``done`` or explicitly ``failed``, none lost, none completed twice (the completion
ledger sees exactly one write per done job, and it is the one the row still carries),
and every result equal to what the model gives the image on its own."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from hepato.common import dispatch
from hepato.common.settings import Settings
from hepato.worker.backends.base import Model
from hepato.worker.decode import decode_rgb
from tests.chaos.conftest import Completion, record, verdict, wait_for
from tests.chaos.frozen import connections, frozen_holding, held_by
from tests.chaos.redis_watch import blocked_in_blpop, monitored
from tests.conftest import SAMPLES
from tests.e2e.conftest import images
from tests.e2e.test_pipeline import db_jobs, slow_models_dir, submit

pytestmark = pytest.mark.slow

Ledger = dict[uuid.UUID, list[Completion]]


def mixed_samples() -> list[Path]:
    """Two tile sizes (320 and 256 px) and two formats, so microbatches are mixed."""
    return [
        *images(SAMPLES, "synthetic_*.png"),
        *images(SAMPLES, "synthetic_*.jpg"),
        *images(SAMPLES, "ihc_colon_tile_*.png"),
    ]


def stream(n: int, offset: int = 0) -> list[Path]:
    paths = mixed_samples()
    return [paths[(offset + i) % len(paths)] for i in range(n)]


def accepted_ids(body: dict[str, Any]) -> list[uuid.UUID]:
    assert body["rejected"] == [], body["rejected"]
    return [uuid.UUID(j["job_id"]) for j in body["jobs"]]


def states(settings: Settings) -> Counter[str]:
    return Counter(j.state for j in db_jobs(settings))


def assert_fresh_results(settings: Settings, models: dict[str, Model], done: list[Any]) -> None:
    """Each done job's boxes equal the default model's on its image alone (the workers
    ran it in mixed microbatches, on one thread; tolerances as test_pipeline's)."""
    model = models[settings.default_model]
    paths = {p.name: p for p in mixed_samples()}
    fresh: dict[str, Any] = {}
    for job in done:
        if job.filename not in fresh:
            found, _, _ = model.predict([decode_rgb(paths[job.filename].read_bytes())])
            fresh[job.filename] = found[0].model_dump(mode="json")
        want, got = fresh[job.filename]["boxes"], job.result["boxes"]
        assert [b["label"] for b in got] == [b["label"] for b in want], job.filename
        for g, w in zip(got, want, strict=True):
            for key in ("x1", "y1", "x2", "y2"):
                assert g[key] == pytest.approx(w[key], abs=1e-2), job.filename
            assert g["score"] == pytest.approx(w["score"], abs=1e-4), job.filename


# --- 1. many workers, half SIGKILLed and half SIGTERMed mid-stream ----------------------
def test_half_the_workers_killed_half_terminated_mid_stream(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    spawn_worker,
    completions,
) -> None:
    one_thread = {"HEPATO_CPU_THREADS": "1", "HEPATO_MAX_BATCH_SIZE": "8"}
    first = [spawn_worker(f"w{i}", **one_thread) for i in range(4)]
    for w in first:
        w.wait_ready(settings.redis_url)
    doomed, polite = first[:2], first[2:]
    # Each names its connections, which frozen_holding reads.
    wait_for("the workers' named connections", lambda: connections(settings, first), 30)

    per_batch, batches = 50, 6
    total = per_batch * batches
    ids: list[uuid.UUID] = []
    for k in range(batches - 1):  # all but the last batch while the four run
        ids += accepted_ids(submit(client, stream(per_batch, offset=k)))

    # Half way, with a SIGKILL target holding a claimed batch (else there is no fault).
    wait_for(
        "half the jobs finished",
        lambda: states(settings)["done"] >= total // 2,
        timeout_s=60,
    )
    wait_for("a doomed worker mid-batch", lambda: frozen_holding(settings, doomed), 10, 0.005)
    in_flight = states(settings)["processing"]
    for w in doomed:
        w.proc.send_signal(signal.SIGKILL)
    for w in polite:
        w.proc.send_signal(signal.SIGTERM)
    fresh = [spawn_worker(f"r{i}", **one_thread) for i in range(2)]

    # The stream goes on through the fault.
    ids += accepted_ids(submit(client, stream(per_batch, offset=batches - 1)))
    for w in doomed:
        assert w.proc.wait(timeout=10) == -signal.SIGKILL
    for w in polite:
        assert w.proc.wait(timeout=15) == 0, w.log_text()

    wait_for(
        "every job finished",
        lambda: sum(states(settings)[s] for s in ("done", "failed")) >= total,
        timeout_s=90,
        every_s=0.2,
    )
    for w in fresh:
        code, _ = w.stop(timeout_s=15)
        assert code == 0, w.log_text()

    result = verdict(settings, ids, completions())
    redelivered = [j for j in result.jobs.values() if j.attempts > 1]
    print(
        f"\n{total} jobs, {in_flight} in flight at the fault; redelivered {len(redelivered)} "
        f"(attempts: {dict(Counter(j.attempts for j in result.jobs.values()))})"
    )
    record(
        "workers: 2 of 4 SIGKILLed, 2 SIGTERMed mid-stream",
        total,
        in_flight,
        len(result.lost),
        len(result.duplicated),
        len(redelivered),
    )
    assert len(ids) == total and len(result.jobs) == total
    assert result.lost == [] and result.duplicated == []
    assert all(j.state == "done" for j in result.jobs.values()), states(settings)
    assert in_flight > 0 and redelivered, "the SIGKILLed batches were finished elsewhere"
    assert all(j.worker_id not in {"w0", "w1"} for j in redelivered)
    assert_fresh_results(settings, models, list(result.jobs.values()))


# --- 2. SIGKILL after the result commit, before the worker's own bookkeeping -----------
def test_killed_right_after_commit_then_redelivered_is_a_no_op(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    spawn_worker,
    run_worker,
    completions,
) -> None:
    ids = accepted_ids(submit(client, stream(12)))
    dying = spawn_worker(
        "dies-after-commit",
        module="tests.chaos.kill_after_commit",
        HEPATO_MAX_BATCH_SIZE="8",
    )
    assert dying.proc.wait(timeout=60) == -signal.SIGKILL, dying.log_text()

    committed = {j.id: j for j in db_jobs(settings) if j.state == "done"}
    assert len(committed) == 8, states(settings)
    assert all(j.worker_id == "dies-after-commit" and j.attempts == 1 for j in committed.values())
    # As a lost acknowledgement would: the same ids handed out again.
    dispatch.push(
        redis.Redis.from_url(settings.redis_url),
        settings.default_model,
        "routine",
        [str(i) for i in committed],
    )
    second = run_worker(worker_id="second")

    result = verdict(settings, ids, completions())
    record(
        "SIGKILL after the result commit, ids redelivered",
        len(ids),
        len(committed),
        len(result.lost),
        len(result.duplicated),
        result.redelivered,
        ids_pushed_again=len(committed),
    )
    assert result.lost == [] and result.duplicated == []
    assert second.jobs_done == len(ids) - len(committed), "it ran only the 4 never claimed"
    for job_id, before in committed.items():
        after = result.jobs[job_id]
        assert (after.state, after.attempts, after.worker_id) == ("done", 1, "dies-after-commit")
        assert (after.finished_at, after.result) == (before.finished_at, before.result)
    # The 4 it had prefetched (claimed, not yet run) ran again after their lease ran out.
    assert all(j.state == "done" and j.attempts <= 2 for j in result.jobs.values())
    assert_fresh_results(settings, models, list(result.jobs.values()))


# --- 3. SIGTERM mid-batch -------------------------------------------------------------
def test_sigterm_mid_batch_finishes_it_takes_nothing_new_and_exits_fast(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    spawn_worker,
    run_worker,
    completions,
    tmp_path: Path,
) -> None:
    ids = accepted_ids(submit(client, stream(24)))
    # 640 px instead of 320: a batch of 8 takes long enough (about 1 s) to be signalled in.
    polite = spawn_worker(
        "polite",
        HEPATO_MODELS_DIR=str(slow_models_dir(settings, tmp_path / "slow-models")),
        HEPATO_MAX_BATCH_SIZE="8",
    )
    held = wait_for("a claimed batch", lambda: held_by(settings, {"polite"}), 60, 0.005)
    signalled_at = datetime.now(UTC)
    code, exit_s = polite.stop(timeout_s=60)
    log = polite.log_text()

    jobs = {j.id: j for j in db_jobs(settings)}
    took = {j.id for j in jobs.values() if j.worker_id == "polite"}
    print(f"\nSIGTERM with {len(held)} jobs in hand: exited {code} in {exit_s:.2f}s")
    assert code == 0, log
    assert "finishing the batch in hand" in log
    assert exit_s < settings.lease_s, f"took {exit_s:.1f}s to exit, lease is {settings.lease_s}s"
    # What it had claimed (the batch in hand, and at most one prefetched) it finished;
    # after the signal it claimed nothing.
    assert took >= {j.id for j in held}
    assert len(took) <= len(held) * (settings.prefetch_batches + 1)
    assert all(jobs[i].state == "done" for i in took), "what it claimed was finished"
    assert all(j.started_at <= signalled_at for j in jobs.values() if j.id in took)
    assert Counter(j.state for j in jobs.values()) == {
        "done": len(took),
        "pending": len(ids) - len(took),
    }, "nothing left processing; the rest still pending"

    run_worker(worker_id="successor")
    result = verdict(settings, ids, completions())
    record(
        "SIGTERM mid-batch",
        len(ids),
        len(held),
        len(result.lost),
        len(result.duplicated),
        result.redelivered,
        exit_s=round(exit_s, 2),
    )
    assert result.lost == [] and result.duplicated == [] and result.redelivered == 0
    rest = [j for j in result.jobs.values() if j.id not in took]
    assert all(j.state == "done" and j.worker_id == "successor" for j in rest)
    assert_fresh_results(settings, models, rest)


def test_sigterm_while_waiting_hands_back_what_it_pops_after(
    client: TestClient,
    settings: Settings,
    spawn_worker,
    run_worker,
    completions,
) -> None:
    """The signal lands while the worker blocks on an empty queue; work that arrives
    before that wait ends must not be started: it goes back to Redis, still pending."""
    server = redis.Redis.from_url(settings.redis_url)
    idle = spawn_worker("idle", HEPATO_POLL_TIMEOUT_S="30")
    idle.wait_ready(settings.redis_url)
    # The server holds the worker's BLPOP (nothing else here blocks on a queue).
    wait_for("the worker blocked in BLPOP", lambda: blocked_in_blpop(server), 30, 0.02)
    idle.proc.send_signal(signal.SIGTERM)
    wait_for(
        "the worker to take the signal",
        lambda: "finishing the batch in hand" in idle.log_text(),
        timeout_s=10,
    )
    # Signalled, and still inside the same wait: what arrives now is what it pops.
    assert blocked_in_blpop(server), "the wait ended before the jobs arrived"
    with monitored(settings.redis_url) as seen:
        ids = accepted_ids(submit(client, stream(8)))
        assert idle.proc.wait(timeout=10) == 0, idle.log_text()
    # Each id went onto the queue twice: pushed by the gateway, then handed back by the
    # worker that popped it (from its own connection, which also took the rest in its
    # fill: one script call for every key).
    pushes = [(who, args) for name in ("RPUSH", "LPUSH") for who, args in seen.sent(name)]
    wanted = {str(i) for i in ids}
    pushed = Counter(i for _, args in pushes for i in args[2:] if i in wanted)
    assert pushed == dict.fromkeys(wanted, 2), pushes
    gateway = next(who for who, args in pushes if wanted & set(args[2:]))
    handed_back = {who for who, args in pushes if wanted & set(args[2:])} - {gateway}
    assert len(handed_back) == 1, pushes
    filled = [who for name in ("EVALSHA", "EVAL") for who, _ in seen.sent(name)]
    assert any(who in handed_back for who in filled) or len(ids) == 1
    jobs = db_jobs(settings)
    assert all(j.state == "pending" and j.attempts == 0 for j in jobs), "it took no job"
    waiting = dispatch.depth(redis.Redis.from_url(settings.redis_url), settings.default_model)
    assert waiting == len(ids), "the ids it popped are back on the queue"
    run_worker(worker_id="successor")
    result = verdict(settings, ids, completions())
    record(
        "SIGTERM while waiting, jobs arrive after",
        len(ids),
        0,
        len(result.lost),
        len(result.duplicated),
        result.redelivered,
    )
    assert result.lost == [] and result.duplicated == [] and result.redelivered == 0


# --- 4. a hung worker (SIGSTOP past its lease), resumed later -----------------------------
def test_hung_worker_loses_its_lease_and_its_late_write_is_refused(
    client: TestClient,
    settings: Settings,
    models: dict[str, Model],
    spawn_worker,
    run_worker,
    completions,
    tmp_path: Path,
) -> None:
    ids = accepted_ids(submit(client, stream(16)))
    # A renewal or a sweep frozen mid-transaction would hold row locks the rescuer's
    # SKIP LOCKED sweep then skips forever; this worker does neither within the test.
    hung = spawn_worker(
        "hung",
        HEPATO_MODELS_DIR=str(slow_models_dir(settings, tmp_path / "slow-models")),
        HEPATO_MAX_BATCH_SIZE="16",
        HEPATO_LEASE_EXTEND_EVERY_S="600",
        HEPATO_SWEEP_INTERVAL_S="3600",
    )
    wait_for("a claimed batch", lambda: held_by(settings, {"hung"}), 60, 0.005)
    hung.proc.send_signal(signal.SIGSTOP)
    held = held_by(settings, {"hung"})
    assert len(held) == len(ids), "frozen while holding the whole batch"

    rescuer = run_worker(worker_id="rescuer")  # sweeps the expired leases, runs them
    rescued = {j.id: j for j in db_jobs(settings)}
    assert rescuer.jobs_done == len(ids)
    lease_until = max(j.lease_until for j in held)
    assert all(j.started_at > lease_until for j in rescued.values()), "only once it expired"

    hung.proc.send_signal(signal.SIGCONT)
    wait_for(
        "the hung worker's refused write",
        lambda: f"{len(ids)} results refused" in hung.log_text(),
        timeout_s=60,
        every_s=0.1,
    )
    code, _ = hung.stop(timeout_s=30)
    assert code == 0, hung.log_text()

    result = verdict(settings, ids, completions())
    record(
        "worker hung (SIGSTOP) past its lease, then resumed",
        len(ids),
        len(held),
        len(result.lost),
        len(result.duplicated),
        result.redelivered,
    )
    assert result.lost == [] and result.duplicated == []
    assert result.redelivered == len(ids)
    for job in result.jobs.values():
        before = rescued[job.id]
        assert (job.state, job.worker_id, job.attempts) == ("done", "rescuer", 2)
        assert (job.finished_at, job.result) == (before.finished_at, before.result)
    # The rescuer ran the 320 px model, the hung worker the 640 px one: had its late
    # write landed, these would differ.
    assert_fresh_results(settings, models, list(result.jobs.values()))
