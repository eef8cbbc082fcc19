"""Jobs per model and state kept by triggers (common.job_state_counts), on real
Postgres: the scrape's statements read no ``jobs`` table whatever its size, and the
counts stay exact through every transition the real functions make, through folds,
concurrent writers, cascades and TRUNCATE."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, event, text

from hepato.common import claim, job_state_counts, jobs, sweep
from hepato.common.constants import PUBLIC_TENANT, Priority
from hepato.common.db import get_engine
from hepato.common.images import ImageInfo
from hepato.common.manifest import ModelManifest, load_registry
from hepato.common.results import DetectResult
from hepato.common.settings import Settings
from tests.e2e.test_metrics import jobs_in, scrape

pytestmark = pytest.mark.slow

# Enough that the old GROUP BY over jobs is a real scan (the test shows the planner picks
# one), few enough to insert in a few seconds.
FILLED = 100_000
STATES = ("pending", "processing", "done", "failed")

Counts = dict[tuple[str, str], int]


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return get_engine(settings.database_url)


@pytest.fixture
def manifest(settings: Settings) -> ModelManifest:
    return load_registry(settings.models_dir)[settings.default_model]


def truth(conn: Connection) -> Counts:
    """What the counters stand for: a count of the jobs table itself."""
    rows = conn.execute(text("SELECT model, state, count(*) FROM jobs GROUP BY model, state"))
    return {(model, state): int(n) for model, state, n in rows}


def counted(engine: Engine) -> Counts:
    """The counters as a scrape reads them, zeros left out (a count of jobs has none)."""
    with engine.connect() as conn:
        return {k: n for k, n in job_state_counts.totals(conn).items() if n}


def assert_exact(engine: Engine) -> Counts:
    with engine.connect() as conn:
        real = truth(conn)
    assert counted(engine) == real
    return real


def fill(engine: Engine, model: str, n: int) -> None:
    """``n`` jobs straight into the table (not through the API), spread over STATES."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant, filename, object_key, image_format, size_bytes,"
                " width, height, model, task, priority, state, attempts, max_attempts)"
                " SELECT gen_random_uuid(), 'public', 'f.png', 'filled/' || g, 'png', 100,"
                " 32, 32, :model, 'detect', 'routine', (CAST(:states AS text[]))[1 + g % 4],"
                " 0, 3 FROM generate_series(1, :n) AS g"
            ),
            {"model": model, "states": list(STATES), "n": n},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE jobs"))


def relations(plan: Any) -> set[str]:
    """Every relation an EXPLAIN (FORMAT JSON) plan reads, at any depth."""
    found: set[str] = set()
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.add(plan["Relation Name"])
        for value in plan.values():
            found |= relations(value)
    elif isinstance(plan, list):
        for value in plan:
            found |= relations(value)
    return found


def explained(conn: Connection, statement: str, parameters: Any) -> set[str]:
    plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar_one()
    return relations(plan)


@pytest.fixture
def captured(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement sent on the gateway's engine while the test runs."""
    statements: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    yield statements
    event.remove(engine, "before_cursor_execute", before)


def test_a_scrape_reads_no_jobs_table_at_any_size(
    client: TestClient, engine: Engine, settings: Settings, captured: list[tuple[str, Any]]
) -> None:
    model = settings.default_model
    fill(engine, model, FILLED)
    with engine.connect() as conn:
        # jobs, and its partitions should it ever be partitioned.
        jobs_relations = {"jobs"} | set(
            conn.execute(
                # Bare names, as EXPLAIN gives them (the partitions are in a schema
                # of their own, off the search path: common.partitions).
                text(
                    "SELECT c.relname FROM pg_partition_tree('jobs') t"
                    " JOIN pg_class c ON c.oid = t.relid"
                )
            )
            .scalars()
            .all()
        )
        # The old scrape's statement, to show what a scan looks like here.
        old = "SELECT model, state, count(*) FROM jobs GROUP BY model, state"
        assert explained(conn, old, {}) & jobs_relations

    captured.clear()
    got = scrape(client)
    statements = list(captured)

    for state in STATES:
        assert jobs_in(got, model, state) == FILLED // 4
    reads = [(s, p) for s, p in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert reads, f"the scrape sent no query: {statements}"
    read_by_scrape: set[str] = set()
    with engine.connect() as conn:
        for statement, parameters in reads:
            read = explained(conn, statement, parameters)
            assert not read & jobs_relations, f"{statement} reads {read & jobs_relations}"
            read_by_scrape |= read
    assert {"job_state_counts", "job_state_deltas"} <= read_by_scrape


def new_jobs(n: int) -> list[jobs.NewJob]:
    image = ImageInfo("png", "image/png", 32, 32, 100)
    return [jobs.NewJob(f"t{i}.png", f"test/{uuid.uuid4()}", image) for i in range(n)]


def submit(
    engine: Engine, manifest: ModelManifest, n: int, deadline_s: float | None = None
) -> list[uuid.UUID]:
    created = jobs.create(
        engine,
        new_jobs(n),
        as_batch=True,
        tenant=PUBLIC_TENANT,
        model=manifest,
        priority=Priority.routine,
        max_attempts=2,
        deadline_s=deadline_s,
        question=None,
        callback_url=None,
    )
    return created.job_ids


def done(job_id: uuid.UUID) -> jobs.JobResult:
    return jobs.JobResult(job_id, DetectResult(boxes=[]), batch_size=1, inference_ms=1.0)


def test_counts_follow_every_transition(
    client: TestClient, engine: Engine, manifest: ModelManifest
) -> None:
    model = manifest.name
    ids = submit(engine, manifest, 8)
    assert assert_exact(engine) == {(model, "pending"): 8}

    token, taken, _ = claim.claim(engine, ids[:5], "w1", lease_s=60)
    assert len(taken) == 5
    assert assert_exact(engine) == {(model, "pending"): 3, (model, "processing"): 5}

    assert jobs.complete(engine, token, [done(i) for i in ids[:2]], "v1") == set(ids[:2])
    jobs.fail(engine, token, {ids[2]: "bad image"}, retry=False)
    jobs.fail(engine, token, {ids[3]: "flaky"}, retry=True)  # back to pending, 1 of 2 tries
    assert jobs.cancel(engine, job_id=ids[5]) == 1
    assert assert_exact(engine) == {
        (model, "pending"): 3,
        (model, "processing"): 1,
        (model, "done"): 2,
        (model, "failed"): 1,
        (model, "canceled"): 1,
    }

    # A lost worker: its lease runs out and the sweeper takes the job back.
    token2, taken2, _ = claim.claim(engine, [ids[6]], "w2", lease_s=0.01)
    assert [j.id for j in taken2] == [ids[6]]
    time.sleep(0.05)
    swept = sweep.sweep(engine)
    assert swept.reclaimed == 1
    assert jobs.complete(engine, token2, [done(ids[6])], "v1") == set()  # fenced off

    # Deadlines: one passes while its job waits (the sweeper), one is found at claim.
    late = submit(engine, manifest, 2, deadline_s=0.01)
    time.sleep(0.05)
    assert sweep.sweep(engine).expired == 2
    later = submit(engine, manifest, 1, deadline_s=0.01)
    time.sleep(0.05)
    _, none, _ = claim.claim(engine, later, "w3", lease_s=60)
    assert none == []
    assert assert_exact(engine) == {
        (model, "pending"): 3,
        (model, "processing"): 1,
        (model, "done"): 2,
        (model, "failed"): 1,
        (model, "canceled"): 1,
        (model, "expired"): 3,
    }
    got = scrape(client)
    for state, n in (("pending", 3), ("done", 2), ("expired", 3), ("canceled", 1)):
        assert jobs_in(got, model, state) == n

    # Whatever folds, the sum does not move; a batch's jobs deleted by its cascade are
    # counted off; TRUNCATE (what the tests' reset does) empties the counts.
    before = assert_exact(engine)
    with engine.begin() as conn:
        assert job_state_counts.fold(conn) > 0
    assert assert_exact(engine) == before
    with engine.begin() as conn:
        conn.execute(
            text("DELETE FROM batches WHERE id = (SELECT batch_id FROM jobs WHERE id = :j)"),
            {"j": late[0]},
        )
    assert assert_exact(engine)[(model, "expired")] == 1
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, batches CASCADE"))
    assert counted(engine) == {}
    assert jobs_in(scrape(client), model, "pending") == 0


def test_concurrent_writers_fold_and_stay_exact(engine: Engine, manifest: ModelManifest) -> None:
    """Writers in threads move jobs to and fro, one transaction per move, enough for
    several folds: every count matches the table, and the deltas left unfolded stay
    under one fold's worth."""
    writers, moves = 4, 500
    ids = submit(engine, manifest, writers)
    errors: list[BaseException] = []

    def write(job_id: uuid.UUID) -> None:
        try:
            for i in range(moves):
                state = "processing" if i % 2 == 0 else "pending"
                with engine.begin() as conn:
                    conn.execute(
                        text("UPDATE jobs SET state = :s WHERE id = :j"), {"s": state, "j": job_id}
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(job_id,)) for job_id in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # Two delta rows per move: this many moves drew past several fold points.
    assert writers * moves * 2 > 3 * job_state_counts.FOLD_EVERY
    assert assert_exact(engine) == {(manifest.name, "pending"): writers}
    with engine.connect() as conn:
        folded = conn.execute(text("SELECT count(*) FROM job_state_counts")).scalar_one()
        left = conn.execute(text("SELECT count(*) FROM job_state_deltas")).scalar_one()
    assert folded > 0
    assert left < job_state_counts.FOLD_EVERY


def test_a_fold_needs_read_committed(engine: Engine, manifest: ModelManifest) -> None:
    submit(engine, manifest, 3)
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        assert job_state_counts.fold(conn) == 0
        conn.rollback()
    with engine.begin() as conn:
        assert job_state_counts.fold(conn) >= 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job_state_deltas")).scalar_one() == 0
    assert assert_exact(engine) == {(manifest.name, "pending"): 3}


def test_rows_the_triggers_do_not_see_are_forgotten_or_rebuilt(
    engine: Engine, manifest: ModelManifest
) -> None:
    """Rows that leave without a DELETE (a partition dropped) or change without an
    UPDATE the triggers see (a restore, a rewrite), played with the triggers off for one
    transaction: ``forget`` beforehand, or ``rebuild`` after, puts the counts right."""
    model = manifest.name
    gone = submit(engine, manifest, 3)
    submit(engine, manifest, 2)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TEMP TABLE leaving ON COMMIT DROP AS "
                "SELECT * FROM jobs WHERE id = ANY(:ids)"
            ),
            {"ids": gone},
        )
        job_state_counts.forget(conn, "leaving")
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("DELETE FROM jobs WHERE id = ANY(:ids)"), {"ids": gone})
    assert assert_exact(engine) == {(model, "pending"): 2}

    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("UPDATE jobs SET state = 'done'"))
    assert counted(engine) == {(model, "pending"): 2}
    with engine.begin() as conn:
        job_state_counts.rebuild(conn)
    assert assert_exact(engine) == {(model, "done"): 2}
