"""Retention (common.retention) on real Postgres and S3: old finished jobs go with their
events, emptied batches, finished slides and objects, in bounded transactions; recent
and unfinished ones, and the audit log, stay; one pass runs at a time.

These are the chunked deletes: the jobs are made (``made_long_ago``) with ids of a day
that has no partition, so they are in the default partition, where no day's drop takes
them (drops: tests/e2e/test_partitions.py)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, event, insert, text
from typer.testing import CliRunner

from hepato.cli.main import app
from hepato.common import ids, job_state_counts, retention, retention_days
from hepato.common.db import get_engine
from hepato.common.settings import Settings, get_settings
from hepato.common.storage import ObjectStore
from hepato.common.tables import Batch, Job, Slide
from hepato.worker.recovery import Recovery
from tests.conftest import SAMPLES

PNGS = sorted(SAMPLES.glob("synthetic_*.png"))
OLD, RECENT = "10 days", "1 day"


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return get_engine(settings.database_url)


@pytest.fixture
def made_long_ago(monkeypatch: pytest.MonkeyPatch) -> None:
    """Job ids made from now on are of 12 days ago (a day without a partition)."""
    then = ids._clock_ms() - 12 * 86_400_000
    monkeypatch.setattr(ids, "_clock_ms", lambda: then)


@pytest.fixture
def store(client: TestClient, settings: Settings) -> ObjectStore:
    return ObjectStore(settings)  # the gateway's startup made the bucket


def submit(client: TestClient, n: int) -> tuple[str, list[str]]:
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in (PNGS * n)[:n]]
    response = client.post("/v1/batches", files=files)
    assert response.status_code == 202, response.text
    body = response.json()
    return body["batch_id"], [j["job_id"] for j in body["jobs"]]


def submit_one(client: TestClient) -> str:
    """A job without a batch."""
    response = client.post("/v1/jobs", files={"file": (PNGS[0].name, PNGS[0].read_bytes())})
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def finish(engine: Engine, ids: list[str], ago: str, state: str = "done") -> None:
    """Mark jobs finished ``ago`` (their events of submission are already there)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET state = :state, finished_at = now() - CAST(:ago AS interval),"
                " enqueued_at = now() - CAST(:ago AS interval) - interval '1 minute'"
                " WHERE id = ANY(:ids)"
            ),
            {"state": state, "ago": ago, "ids": [uuid.UUID(i) for i in ids]},
        )


def keys_of(engine: Engine, ids: list[str]) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT object_key FROM jobs WHERE id = ANY(:ids)"),
                {"ids": [uuid.UUID(i) for i in ids]},
            ).scalars()
        )


def existing(engine: Engine, table: str, column: str, ids: list[str]) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT DISTINCT {column} FROM {table} WHERE {column} = ANY(:ids)"),
            {"ids": [uuid.UUID(i) for i in ids]},
        ).scalars()
        return {str(r) for r in rows}


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


@pytest.fixture
def transactions(engine: Engine) -> Iterator[list[int]]:
    """Jobs deleted per committed transaction, as Postgres saw them."""
    sizes: list[int] = []
    pending: dict[int, int] = {}

    def before(conn: Any, clauseelement: Any, multi: Any, params: Any, options: Any) -> None:
        if "DELETE FROM jobs" in str(clauseelement):
            pending[id(conn)] = pending.get(id(conn), 0) + len(params["ids"])

    def commit(conn: Connection) -> None:
        if id(conn) in pending:
            sizes.append(pending.pop(id(conn)))

    event.listen(engine, "before_execute", before)
    event.listen(engine, "commit", commit)
    yield sizes
    event.remove(engine, "before_execute", before)
    event.remove(engine, "commit", commit)


def test_old_finished_jobs_go_with_events_objects_and_emptied_batches(
    client: TestClient,
    engine: Engine,
    store: ObjectStore,
    transactions: list[int],
    made_long_ago: None,
) -> None:
    gone_batch, gone = submit(client, 3)  # all old and finished: the batch goes too
    kept_batch, mixed = submit(client, 3)  # one old, one recent, one unfinished
    lone = submit_one(client)
    finish(engine, [lone], OLD, "expired")
    finish(engine, gone, OLD)
    finish(engine, gone[2:], OLD, "failed")
    finish(engine, mixed[:1], OLD, "canceled")
    finish(engine, mixed[1:2], RECENT)
    with engine.begin() as conn:  # unfinished, though submitted long ago
        conn.execute(
            text(
                "UPDATE jobs SET created_at = now() - interval '30 days',"
                " enqueued_at = now() - interval '30 days' WHERE id = :id"
            ),
            {"id": uuid.UUID(mixed[2])},
        )
        conn.execute(
            text(
                "INSERT INTO idempotency_keys (tenant, key, request_hash, state, expires_at)"
                " VALUES ('public', 'old', 'h', 'done', now() - interval '1 second'),"
                " ('public', 'live', 'h', 'done', now() + interval '1 hour')"
            )
        )
    doomed, kept = [*gone, mixed[0], lone], mixed[1:]
    doomed_keys, kept_keys = keys_of(engine, doomed), keys_of(engine, kept)
    assert all(store.exists(k) for k in doomed_keys + kept_keys)
    audit_rows = count(engine, "SELECT count(*) FROM audit_events")
    assert audit_rows > 0  # the submissions were audited
    events_before = count(engine, "SELECT count(*) FROM job_events")

    done = retention.run(engine, store, 7.0, chunk=2)

    assert (done.jobs, done.batches, done.objects, done.objects_failed) == (5, 1, 5, 0)
    assert done.idempotency_keys == 1 and done.ran and not done.more
    # 5 jobs by 2: three transactions (a fourth finds none and deletes nothing).
    assert done.transactions == 3 and transactions == [2, 2, 1]
    assert existing(engine, "jobs", "id", doomed + kept) == set(kept)
    assert not existing(engine, "job_events", "job_id", doomed)
    assert existing(engine, "job_events", "job_id", kept) == set(kept)
    assert done.events == events_before - count(engine, "SELECT count(*) FROM job_events")
    assert existing(engine, "batches", "id", [gone_batch, kept_batch]) == {kept_batch}
    assert not any(store.exists(k) for k in doomed_keys)
    assert all(store.exists(k) for k in kept_keys)
    assert count(engine, "SELECT count(*) FROM idempotency_keys") == 1
    assert count(engine, "SELECT count(*) FROM audit_events") == audit_rows
    # The kept counts follow the deletes: still a count of the rows that exist.
    with engine.connect() as conn:
        totals = {k: n for k, n in job_state_counts.totals(conn).items() if n}
        truth = conn.execute(text("SELECT model, state, count(*) FROM jobs GROUP BY 1, 2"))
        assert totals == {(m, s): int(n) for m, s, n in truth}
    # A second pass finds nothing.
    assert retention.run(engine, store, 7.0, chunk=2).jobs == 0


def slide(
    conn: Connection, store: ObjectStore, state: str, finished: str | None, tiles: str
) -> tuple[uuid.UUID, list[str]]:
    """A whole slide's rows as a worker leaves them, with its three objects stored: a
    plan job and two tiles finished ``tiles`` ago."""
    sid = uuid.uuid4()
    prefix = f"slides/{sid.hex}"
    keys = [f"uploads/test/{sid.hex}.svs", f"{prefix}/thumbnail.png", f"{prefix}/tissue_mask.png"]
    for key in keys:
        store.put(key, b"x", "application/octet-stream")
    common = {"tenant": "public", "model": "blobs", "priority": "routine"}
    conn.execute(insert(Batch).values(id=sid, total=3, **common))
    conn.execute(
        insert(Slide).values(
            id=sid,
            filename="s.svs",
            object_key=keys[0],
            thumbnail_key=keys[1],
            mask_key=keys[2],
            format="aperio",
            size_bytes=1,
            state=state,
            deidentify=False,
            deidentified=False,
            tiles_total=2,
            finished_at=text(f"now() - interval '{finished}'") if finished else None,
            **common,
        )
    )
    ago = text(f"now() - interval '{tiles}'")
    for kind in ("plan", "tile", "tile"):
        conn.execute(
            insert(Job).values(
                batch_id=sid,
                kind=kind,
                filename="s.svs",
                object_key=keys[0],
                image_format="aperio",
                size_bytes=0,
                width=1,
                height=1,
                task="detect",
                state="done",
                attempts=1,
                max_attempts=3,
                finished_at=ago,
                enqueued_at=ago,
                **common,
            )
        )
    return sid, keys


def test_a_slide_goes_only_once_it_finished_long_ago_and_its_objects_with_it(
    client: TestClient, engine: Engine, store: ObjectStore, made_long_ago: None
) -> None:
    with engine.begin() as conn:
        old, old_keys = slide(conn, store, "done", OLD, OLD)
        recent, recent_keys = slide(conn, store, "done", RECENT, OLD)
        # Tiles done long ago, the slide still open (a tile retried for days).
        running, running_keys = slide(conn, store, "processing", None, OLD)

    done = retention.run(engine, store, 7.0)

    assert (done.jobs, done.slides, done.batches, done.objects) == (3, 1, 1, 3)
    ids = [str(old), str(recent), str(running)]
    assert existing(engine, "slides", "id", ids) == {str(recent), str(running)}
    assert existing(engine, "jobs", "batch_id", ids) == {str(recent), str(running)}
    assert not any(store.exists(k) for k in old_keys)
    assert all(store.exists(k) for k in recent_keys + running_keys)


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HEPATO_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("HEPATO_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("HEPATO_S3_ENDPOINT", settings.s3_endpoint)
    monkeypatch.setenv("HEPATO_S3_BUCKET", settings.s3_bucket)
    monkeypatch.delenv("HEPATO_RETENTION_DAYS", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_command_dry_runs_then_deletes_and_one_pass_runs_at_a_time(
    client: TestClient,
    engine: Engine,
    store: ObjectStore,
    cli_env: None,
    tmp_path: Path,
    made_long_ago: None,
) -> None:
    _, ids = submit(client, 3)
    finish(engine, ids, OLD)
    keys = keys_of(engine, ids)
    runner = CliRunner()

    dry = runner.invoke(app, ["retention", "run", "--older-than", "7", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete" in dry.output and "jobs" in dry.output
    assert existing(engine, "jobs", "id", ids) == set(ids)
    assert all(store.exists(k) for k in keys)
    counted = retention.run(engine, store, 7.0, dry_run=True)
    assert (counted.jobs, counted.batches, counted.objects, counted.events) == (3, 1, 3, 3)

    # A pass holds the lock: a second one does nothing and says so.
    with engine.connect() as holder:
        assert holder.execute(
            text("SELECT pg_try_advisory_lock(:c, :i)"),
            {"c": retention.LOCK_CLASS, "i": retention.LOCK_ID},
        ).scalar_one()
        blocked = runner.invoke(app, ["retention", "run", "--older-than", "7"])
        assert blocked.exit_code == 1 and "another retention pass" in blocked.output
        assert not retention.run(engine, store, 7.0).ran
        assert existing(engine, "jobs", "id", ids) == set(ids)
        holder.execute(
            text("SELECT pg_advisory_unlock(:c, :i)"),
            {"c": retention.LOCK_CLASS, "i": retention.LOCK_ID},
        )

    ran = runner.invoke(app, ["retention", "run", "--older-than", "7", "--chunk", "2"])
    assert ran.exit_code == 0, ran.output
    assert "deleted" in ran.output
    assert not existing(engine, "jobs", "id", ids)
    assert not any(store.exists(k) for k in keys)
    no_age = runner.invoke(app, ["retention", "run"])
    assert no_age.exit_code != 0 and "older-than" in no_age.output


def test_the_sweeper_runs_retention_when_set_and_a_bounded_step_at_a_time(
    client: TestClient, engine: Engine, settings: Settings, made_long_ago: None
) -> None:
    _, ids = submit(client, 3)
    finish(engine, ids, OLD)

    def recovery(**overrides: object) -> Recovery:
        return Recovery(
            settings.model_copy(update=overrides),
            engine,
            redis.Redis.from_url(settings.redis_url),
            "retention-test",
            [settings.default_model],
            threading.Event(),
        )

    recovery().retain_once()  # off by default: keeps everything
    assert existing(engine, "jobs", "id", ids) == set(ids)
    # At most 2 transactions of 1 job per sweep: one job is left for the next.
    step = {"retention_days": 7.0, "retention_chunk": 1, "retention_chunks_per_sweep": 2}
    recovery(**step).retain_once()
    assert len(existing(engine, "jobs", "id", ids)) == 1
    recovery(**step).retain_once()
    assert not existing(engine, "jobs", "id", ids)


def scans(plan: Any) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that reads a table or an index."""
    found: list[dict[str, Any]] = []
    if isinstance(plan, dict):
        if "Relation Name" in plan or "Index Name" in plan:
            found.append(plan)
        for value in plan.values():
            found += scans(value)
    elif isinstance(plan, list):
        for value in plan:
            found += scans(value)
    return found


@pytest.mark.slow
def test_a_chunk_is_found_through_an_index_among_many_recent_jobs(
    settings: Settings, engine: Engine
) -> None:
    # 10^5 finished jobs within the retention period, 50 older: a chunk must find the
    # 50 without reading the others.
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant, filename, object_key, image_format, size_bytes,"
                " width, height, model, task, priority, state, attempts, max_attempts,"
                " enqueued_at, finished_at)"
                " SELECT gen_random_uuid(), 'public', 'f.png', 'filled/' || g, 'png', 1,"
                " 1, 1, 'm', 'detect', 'routine', CASE WHEN g % 7 = 0 THEN 'failed'"
                " ELSE 'done' END, 1, 3, now() - t, now() - t + interval '1 second'"
                " FROM generate_series(1, 100050) AS g,"
                " LATERAL (SELECT CASE WHEN g <= 50 THEN interval '20 days'"
                " ELSE (g % 1000) * interval '1 minute' END) AS a(t)"
            )
        )
        conn.execute(text("ANALYZE jobs"))
    with engine.begin() as conn:
        cutoff = conn.execute(text("SELECT now() - interval '7 days'")).scalar_one()
        sql, skip = retention.outside_sql(
            retention._TAKE, retention_days.skipped_ranges(conn, cutoff)
        )
        plan = conn.execute(
            text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql), {**skip, "cutoff": cutoff, "n": 1000}
        ).scalar_one()
        # jobs is partitioned by day: these (v4) ids are in its default and legacy
        # partitions, each read through its partition of ix_jobs_state_enqueued.
        tree = "SELECT c.relname FROM pg_partition_tree(CAST(:t AS regclass)) p"
        tree += " JOIN pg_class c ON c.oid = p.relid WHERE p.isleaf"
        parts = set(conn.execute(text(tree), {"t": "jobs"}).scalars())
        indexes = set(conn.execute(text(tree), {"t": "ix_jobs_state_enqueued"}).scalars())
    nodes = scans(plan)
    jobs = [node for node in nodes if node.get("Relation Name") in parts]
    assert jobs and all(node["Node Type"] != "Seq Scan" for node in jobs), plan
    # No day partition is read: the chunks leave days to the drops.
    assert {node["Relation Name"] for node in jobs} <= {"jobs_default", "jobs_legacy"}, plan
    # Found through (state, enqueued_at): the 50 old rows read, none of the recent ones.
    index = [node for node in nodes if node.get("Index Name") in indexes]
    assert index and all(node["Node Type"] != "Seq Scan" for node in index), plan
    assert sum(node["Actual Rows"] for node in index) == 50, plan
