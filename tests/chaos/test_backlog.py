"""The sweeper under a backlog (issue 12, items 4 and 7), on the real services with real
worker processes sweeping: a backlog with no Redis fault gets no pushes at all, a
``FLUSHALL`` is repaired within one sweep interval, the queue of a model no worker serves
does not grow, ``GET /v1/models`` says which models have live workers, and a deadline
fires while its job waits.

The backlogs are written straight into Postgres (one INSERT … SELECT generate_series)
and onto the Redis lists, as the gateway would leave them, so that 20,000 jobs take a
second to set up. Pushes are counted by Redis itself (``INFO commandstats``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from hepato.common import lost_ids
from hepato.common.constants import queue_key, taken_key
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from tests.chaos.conftest import SWEEPING, Spawned, record, wait_for
from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow

BACKLOG = 20_000
UNSERVED = "hepato-yolov8n"  # the workers below serve only the null model
SWEEP_S = float(SWEEPING["HEPATO_SWEEP_INTERVAL_S"])
PERIOD_S = float(SWEEPING["HEPATO_REQUEUE_PENDING_AFTER_S"])
NULL_ONLY = {"HEPATO_WORKER_MODELS": '["null"]'}

_INSERT = text(
    """
    INSERT INTO jobs (id, tenant, filename, object_key, image_format, size_bytes, width,
                      height, model, task, priority, state, attempts, max_attempts,
                      deadline_at, callback_url, created_at, enqueued_at)
    SELECT gen_random_uuid(), 'public', 'tile_' || g || '.png', :key, 'png', :size,
           :width, :height, :model, 'detect', 'routine', 'pending', 0, 3,
           now() + make_interval(secs => CAST(:deadline_in AS double precision)),
           CAST(:callback AS text),
           -- A microsecond apart, in the order pushed: "oldest first" has one answer.
           now() - make_interval(secs => :age) + g * interval '1 microsecond',
           now() - make_interval(secs => :age)
    FROM generate_series(1, :n) AS g
    RETURNING id
    """
)


def backlog(
    settings: Settings,
    model: str,
    n: int,
    *,
    key: str = "uploads/missing.png",
    age_s: float = 0.0,
    deadline_in_s: float | None = None,
    callback: str | None = None,
) -> list[str]:
    """``n`` pending jobs of ``model``, committed then pushed as the gateway does;
    ``age_s`` back-dates them (a backlog that has waited that long)."""
    with get_engine(settings.database_url).begin() as conn:
        rows = conn.execute(
            _INSERT,
            {
                "key": key,
                "size": 1000,
                "width": 320,
                "height": 320,
                "model": model,
                "n": n,
                "age": age_s,
                "deadline_in": deadline_in_s,
                "callback": callback,
            },
        ).all()
    ids = [str(row[0]) for row in rows]
    client = redis.Redis.from_url(settings.redis_url)
    for start in range(0, len(ids), 5000):
        client.rpush(queue_key(model, "routine"), *ids[start : start + 5000])
    return ids


def pushes(client: redis.Redis) -> int:
    """RPUSH and LPUSH calls since the last CONFIG RESETSTAT, by every client."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0)) for cmd in ("rpush", "lpush"))


def queued(client: redis.Redis, model: str) -> list[str]:
    return [raw.decode() for raw in client.lrange(queue_key(model, "routine"), 0, -1)]


def pending_ids(settings: Settings, model: str) -> set[str]:
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(
            text("SELECT id FROM jobs WHERE model = :m AND state = 'pending'"), {"m": model}
        ).all()
    return {str(row[0]) for row in rows}


def count_states(settings: Settings) -> dict[str, int]:
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all()
    return {state: n for state, n in rows}


def watch(seconds: float, check: Callable[[], None], every_s: float = 0.1) -> None:
    """Hold ``check`` for a whole window of sweeps (the property is that nothing
    happens, so there is no event to await): it fails at the first breach."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check()
        time.sleep(every_s)
    check()


def null_worker(spawn_worker: Callable[..., Spawned], settings: Settings, name: str) -> Spawned:
    worker = spawn_worker(name, **NULL_ONLY)
    worker.wait_ready(settings.redis_url)
    return worker


def test_a_backlog_with_no_redis_fault_gets_no_duplicate_push(
    settings: Settings, spawn_worker: Callable[..., Spawned]
) -> None:
    """20,000 jobs that have waited an hour, drained by two workers while their sweepers
    run for four look periods: not one id is pushed again. 1,000 jobs of a model no
    worker serves sit in their list, which does not grow."""
    r = redis.Redis.from_url(settings.redis_url)
    # A running system: the sweepers have compared Redis with Postgres once already.
    lost_ids.recover(get_engine(settings.database_url), r, PERIOD_S)
    store = ObjectStore(settings)
    store.ensure_bucket()
    key = f"uploads/backlog/{uuid.uuid4()}.png"
    store.put(key, (SAMPLES / "synthetic_00.png").read_bytes(), "image/png")
    served = backlog(settings, "null", BACKLOG, key=key, age_s=3600)
    unserved = backlog(settings, UNSERVED, 1000, age_s=3600)
    r.config_resetstat()
    workers = [null_worker(spawn_worker, settings, f"drain-{i}") for i in range(2)]

    def no_push() -> None:
        assert pushes(r) == 0, f"{pushes(r)} pushes with no Redis fault"
        assert r.llen(queue_key(UNSERVED, "routine")) == len(unserved)

    window_s = 4 * PERIOD_S + 2 * SWEEP_S
    watch(window_s, no_push)
    done = count_states(settings).get("done", 0)
    assert done > 0, "the workers drained the backlog while the sweepers ran"
    for worker in workers:  # each hands back what it popped after SIGTERM
        code, _ = worker.stop(timeout_s=30)
        assert code == 0, worker.log_text()

    # Every pending id is on its list exactly once: nothing lost, nothing doubled.
    for model in ("null", UNSERVED):
        listed = queued(r, model)
        assert len(listed) == len(set(listed)), f"{model}: an id is queued twice"
        assert set(listed) == pending_ids(settings, model), f"{model}: a pending id is missing"
    record(
        f"no fault: {len(served):,}-job backlog drained by 2 workers, sweeping for "
        f"{window_s:.0f}s; 1,000 more of a model no worker serves",
        len(served) + len(unserved),
        len(served) + len(unserved),
        0,
        0,
        0,
        duplicate_pushes=0,
        done_in_window=done,
    )


def test_after_flushall_every_pending_job_is_back_within_one_sweep_interval(
    settings: Settings, spawn_worker: Callable[..., Spawned]
) -> None:
    ids = backlog(settings, UNSERVED, BACKLOG)
    worker = null_worker(spawn_worker, settings, "flush")
    r = redis.Redis.from_url(settings.redis_url)
    assert r.llen(queue_key(UNSERVED, "routine")) == BACKLOG

    r.flushall()
    flushed = time.monotonic()
    wait_for(
        "the backlog back on its list",
        lambda: r.llen(queue_key(UNSERVED, "routine")) >= BACKLOG,
        timeout_s=60,
        every_s=0.01,
    )
    took = time.monotonic() - flushed
    listed = queued(r, UNSERVED)
    assert len(listed) == BACKLOG and set(listed) == set(ids), "each id back, once"
    # One sweep interval, plus the repair itself (20,000 rows read, 20,000 ids pushed)
    # on a machine whose two cores other test runs share.
    assert took < SWEEP_S + 2.0, f"back after {took:.2f}s"

    # Repaired once: the sweeps after it push nothing more.
    r.config_resetstat()
    watch(2 * PERIOD_S + 2 * SWEEP_S, lambda: _no_push(r))
    assert r.llen(queue_key(UNSERVED, "routine")) == BACKLOG
    assert worker.proc.poll() is None
    record(
        f"Redis FLUSHALL under a {BACKLOG:,}-job backlog: all back in {took:.2f}s "
        f"(sweep interval {SWEEP_S}s), each id once",
        BACKLOG,
        BACKLOG,
        0,
        0,
        0,
        back_after_s=round(took, 2),
    )


def _no_push(r: redis.Redis) -> None:
    assert pushes(r) == 0, f"{pushes(r)} pushes after the repair"


def test_a_model_no_worker_serves_waits_without_growing_and_models_says_so(
    settings: Settings, client: TestClient, spawn_worker: Callable[..., Spawned]
) -> None:
    response = client.post(
        "/v1/batches",
        files=[("files", (p.name, p.read_bytes(), "image/png")) for p in _pngs(3)],
        data={"model": UNSERVED},
    )
    assert response.status_code == 202, response.text
    # As if they had waited a long time already.
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(text("UPDATE jobs SET enqueued_at = now() - interval '1 hour'"))
    null_worker(spawn_worker, settings, "other-model")
    r = redis.Redis.from_url(settings.redis_url)
    r.config_resetstat()

    def unchanged() -> None:
        assert r.llen(queue_key(UNSERVED, "routine")) == 3
        _no_push(r)

    watch(2 * PERIOD_S + 2 * SWEEP_S, unchanged)
    assert count_states(settings) == {"pending": 3}

    listed = {m["name"]: m for m in client.get("/v1/models").json()}
    assert listed["null"]["workers"] == 1
    assert listed[UNSERVED]["workers"] == 0


def _pngs(n: int) -> list[Path]:
    return sorted(SAMPLES.glob("synthetic_*.png"))[:n]


def test_a_deadline_passes_while_the_job_waits_for_a_model_nobody_serves(
    settings: Settings, spawn_worker: Callable[..., Spawned]
) -> None:
    null_worker(spawn_worker, settings, "deadlines")
    deadline_s = 1.0
    hooked = backlog(
        settings, UNSERVED, 1, deadline_in_s=deadline_s, callback="http://127.0.0.1:9/hook"
    )
    quiet = backlog(settings, UNSERVED, 1, deadline_in_s=deadline_s)
    submitted = time.monotonic()
    engine = get_engine(settings.database_url)

    def expired() -> bool:
        return count_states(settings) == {"expired": 2}

    wait_for("both jobs expired", expired, timeout_s=30, every_s=0.02)
    late = time.monotonic() - submitted - deadline_s
    assert late < SWEEP_S + 1.5, f"expired {late:.2f}s after the deadline"
    with engine.connect() as conn:
        jobs = conn.execute(
            text("SELECT id, error, finished_at FROM jobs WHERE id = ANY(:ids)"),
            {"ids": [uuid.UUID(i) for i in hooked + quiet]},
        ).all()
        events = conn.execute(
            text("SELECT job_id, state FROM job_events WHERE job_id = ANY(:ids)"),
            {"ids": [uuid.UUID(i) for i in hooked + quiet]},
        ).all()
        hooks = conn.execute(text("SELECT body FROM webhook_deliveries")).scalars().all()
    for _, error, finished_at in jobs:
        assert error == "deadline passed before it ran" and finished_at is not None
    assert sorted((str(j), s) for j, s in events) == sorted(
        [(hooked[0], "expired"), (quiet[0], "expired")]
    )
    assert len(hooks) == 1 and hooked[0] in hooks[0] and '"expired"' in hooks[0]
    record(
        "deadline passed while waiting for a model no worker serves: expired "
        f"{late:.1f}s after it, event and webhook queued",
        2,
        2,
        0,
        0,
        0,
        late_s=round(late, 2),
    )


def test_ids_popped_by_a_worker_that_died_before_its_claim_are_pushed_again(
    settings: Settings, spawn_worker: Callable[..., Spawned]
) -> None:
    """Redis kept everything but the ids a worker popped and never claimed (it died in
    between): no marker is missing, so they are found by two looks in a row at the
    queues, and only they are pushed."""
    r = redis.Redis.from_url(settings.redis_url)
    lost_ids.recover(get_engine(settings.database_url), r, PERIOD_S)
    ids = backlog(settings, UNSERVED, 100, age_s=3600)
    popped = [raw.decode() for raw in r.lpop(queue_key(UNSERVED, "routine"), 10)]
    r.config_resetstat()
    null_worker(spawn_worker, settings, "rescuer")
    # From the rescuer's start, not its spawn: a worker's imports take 3-8 s on 2 busy
    # cores, which is no part of the two looks measured here.
    ready = time.monotonic()
    wait_for(
        "the popped ids back on their queue",
        lambda: r.llen(queue_key(UNSERVED, "routine")) >= len(ids),
        timeout_s=60,
        every_s=0.05,
    )
    took = time.monotonic() - ready
    listed = queued(r, UNSERVED)
    assert len(listed) == len(ids) and set(listed) == set(ids), "each id once"
    assert listed[-len(popped) :] == popped and pushes(r) == 1
    # Two looks a period apart, each at a sweep.
    assert took < 2 * (PERIOD_S + SWEEP_S) + 2.0, f"back after {took:.1f}s"
    record(
        f"worker died between pop and claim: its {len(popped)} ids pushed again after "
        f"{took:.1f}s (2 looks {PERIOD_S:.0f}s apart), the other {len(ids) - len(popped)} "
        "left alone",
        len(ids),
        len(popped),
        0,
        0,
        0,
        back_after_s=round(took, 1),
    )


def test_an_id_pushed_to_a_head_start_taker_that_died_is_pushed_again(
    settings: Settings, spawn_worker: Callable[..., Spawned]
) -> None:
    """A gateway's push sent the id to the worker that ran its head start (worker.
    head_start), and that worker died before it read its list: the job is missing from
    its queue, so the sweeper's two looks push it again, as for an id popped and never
    claimed."""
    r = redis.Redis.from_url(settings.redis_url)
    lost_ids.recover(get_engine(settings.database_url), r, PERIOD_S)
    ids = backlog(settings, UNSERVED, 3, age_s=3600)
    routed = r.lpop(queue_key(UNSERVED, "routine")).decode()  # type: ignore[union-attr]
    r.rpush(taken_key("dead-worker", UNSERVED), routed)
    null_worker(spawn_worker, settings, "rescuer")
    wait_for(
        "the routed id back on its queue",
        lambda: r.llen(queue_key(UNSERVED, "routine")) >= len(ids),
        timeout_s=60,
        every_s=0.05,
    )
    assert sorted(queued(r, UNSERVED)) == sorted(ids) and queued(r, UNSERVED)[-1] == routed
