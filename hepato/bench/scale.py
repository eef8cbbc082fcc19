"""``hepato bench scale``: claim + complete against a jobs table already holding
millions of rows, with 1, 2, 4 burst workers of the null model.

For each table size (filler rows written in Postgres by ``INSERT ... SELECT
generate_series``, never through the API: hepato.bench.scale_fill) and each worker
count: a fixed number of null-model jobs is created as the gateway creates them
(common.jobs.create, ids pushed with common.dispatch.push, the image inline in Redis so
no download is measured), then burst workers (hepato.bench.scale_worker) drain them.
Each such run is paired with one just before it against an empty jobs table (a second
database on the same server, emptied before each run), so that the filled/empty ratio
compares runs a few seconds apart rather than minutes apart on a VM whose speed drifts.
Measured: jobs/s from the first claim to the last complete (the jobs' own timestamps),
each claim and complete transaction's time (in the workers), Postgres lock waits
(sampled from pg_stat_activity and pg_locks in a thread) and Postgres CPU per job
(psutil on the server's processes), both in hepato.bench.scale_probes. Tables, targets
and files are hepato.bench.scale_report's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, text

from hepato.bench import report, scale_report
from hepato.bench.scale_fill import baseline_database, fill_to
from hepato.bench.scale_probes import LockSampler, postgres_cpu_s
from hepato.common import dispatch, jobs
from hepato.common.constants import PUBLIC_TENANT, Priority
from hepato.common.db import get_engine
from hepato.common.exceptions import BenchFailed
from hepato.common.images import ImageInfo
from hepato.common.manifest import load_registry
from hepato.common.migrate import run_migrations
from hepato.common.settings import REPO_ROOT, Settings
from hepato.devstack.localstack import LocalStack

MODEL = "null"
READY_KEY, GO_KEY = "hepato:bench:scale:ready", "hepato:bench:scale:go"
# --quick: what the test suite runs.
QUICK_SIZES, QUICK_WORKERS, QUICK_JOBS, QUICK_REPEAT = (20_000,), (1, 2), 300, 1


@dataclass
class ScaleOptions:
    out: Path = REPO_ROOT / ".data" / "bench"
    # Filler rows in jobs; each filled run is paired with one on an empty table.
    sizes: tuple[int, ...] = (1_000_000, 5_000_000)
    workers: tuple[int, ...] = (1, 2, 4)
    jobs: int = 2000  # null-model jobs per run
    repeat: int = 3  # runs per size and worker count; the targets take their median
    events_per_job: int = 1  # job_events rows per filler job
    fill_chunk: int = 500_000  # filler rows per INSERT statement
    sample_ms: float = 20.0  # lock-wait sampling period
    timeout_s: float = 600.0  # per run


# One job's image: 8x8 grey PNG, sent inline so the workers download nothing.
def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


# --- one run ---------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _tx_summary(seconds: list[float], writes: list[float], jobs_writes: list[float]) -> dict:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "count": len(seconds),
        "p50_ms": ms(percentile(seconds, 0.5)),
        "p99_ms": ms(percentile(seconds, 0.99)),
        "max_ms": ms(max(seconds, default=None)),
        "write_statements": sorted({int(w) for w in writes}),
        "jobs_write_statements": sorted({int(w) for w in jobs_writes}),
    }


class ScaleBench:
    def __init__(self, opts: ScaleOptions, local: LocalStack, settings: Settings) -> None:
        self.opts, self.local, self.settings = opts, local, settings
        self.engine = get_engine(local.database_url)
        self.baseline = get_engine(baseline_database(self.engine))
        self.redis = redis.Redis.from_url(local.redis_url)
        self.model = load_registry(settings.models_dir)[MODEL]
        self.png = _png()
        self.runs = 0

    def submit(self, engine: Engine, count: int) -> list[uuid.UUID]:
        """``count`` pending null-model jobs, created and pushed as the gateway does."""
        image = ImageInfo("png", "image/png", 8, 8, len(self.png))
        ids: list[uuid.UUID] = []
        for start in range(0, count, 500):
            new = [
                jobs.NewJob(f"scale_{i}.png", f"bench-scale/{i}.png", image)
                for i in range(start, min(count, start + 500))
            ]
            created = jobs.create(
                engine,
                new,
                as_batch=False,
                tenant=PUBLIC_TENANT,
                model=self.model,
                priority=Priority.routine,
                max_attempts=3,
                deadline_s=None,
                question=None,
                callback_url=None,
            )
            dispatch.push(
                self.redis,
                MODEL,
                Priority.routine,
                [str(i) for i in created.job_ids],
                inline={str(i): self.png for i in created.job_ids},
                inline_ttl_s=self.opts.timeout_s + 600,
            )
            ids.extend(created.job_ids)
        return ids

    def _env(self, worker_id: str, engine: Engine) -> dict[str, str]:
        return {
            **os.environ,
            **self.local.env(),
            "HEPATO_DATABASE_URL": engine.url.render_as_string(hide_password=False),
            "HEPATO_MODELS_DIR": str(self.settings.models_dir),
            "HEPATO_WORKER_MODELS": json.dumps([MODEL]),
            "HEPATO_WORKER_ID": worker_id,
            "HEPATO_WORKER_METRICS_PORT": "0",
            # Workers share two cores with Postgres: one decoder process each.
            "HEPATO_DECODE_PROCESSES": "1",
            "HEPATO_CPU_THREADS": "1",
            "HEPATO_POLL_TIMEOUT_S": "0.2",
        }

    def spawn(
        self, count: int, folder: Path, engine: Engine
    ) -> list[tuple[Path, subprocess.Popen]]:
        """``count`` burst workers, waiting for the word go once ready (``go``)."""
        self.runs += 1
        self.redis.delete(READY_KEY, GO_KEY)
        procs = []
        for i in range(count):
            name = f"scale-{self.runs}-worker-{i}"
            path = folder / f"{name}.json"
            procs.append((path, self.local.spawn(name, self._cmd(path), self._env(name, engine))))
        deadline = time.monotonic() + self.opts.timeout_s
        while int(self.redis.get(READY_KEY) or 0) < count:
            for path, proc in procs:
                if proc.poll() is not None:
                    raise BenchFailed("scale", f"{path.stem} exited before it was ready")
            if time.monotonic() > deadline:
                raise BenchFailed("scale", "workers not ready in time")
            time.sleep(0.05)
        return procs

    def drain(self, procs: list[tuple[Path, subprocess.Popen]], folder: Path) -> list[dict]:
        """Say go, then wait for every worker to drain the queue and exit; their timings."""
        self.redis.set(GO_KEY, "1")
        deadline = time.monotonic() + self.opts.timeout_s
        try:
            for path, proc in procs:
                proc.wait(max(0.1, deadline - time.monotonic()))
                if proc.returncode != 0:
                    raise BenchFailed(
                        "scale", f"{path.stem} exited with {proc.returncode}; logs in {folder}"
                    )
        except Exception as exc:
            for _, proc in procs:
                if proc.poll() is None:
                    proc.kill()
            if isinstance(exc, BenchFailed):
                raise
            raise BenchFailed("scale", f"workers not done after {self.opts.timeout_s:g}s") from exc
        finally:
            live = {p for _, p in procs}
            self.local.apps[:] = [(n, p) for n, p in self.local.apps if p not in live]
        return [json.loads(path.read_text()) for path, _ in procs]

    @staticmethod
    def _cmd(path: Path) -> list[str]:
        return [sys.executable, "-m", "hepato.bench.scale_worker", str(path), READY_KEY, GO_KEY]

    @staticmethod
    def outcome(engine: Engine, ids: list[uuid.UUID]) -> dict[str, Any]:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE state = 'done'), count(*),"
                    " extract(epoch FROM max(finished_at) - min(started_at))"
                    " FROM jobs WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            ).one()
        return {"done": int(row[0]), "found": int(row[1]), "span_s": float(row[2] or 0.0)}

    def checkpoint(self) -> None:
        """Start each run just after a checkpoint: the fill's gigabytes leave one under
        way (or due) that would otherwise land in the large table's runs only, and the
        full-page images after any checkpoint then weigh the same on every run."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("CHECKPOINT"))

    def run(self, size: int, count: int, folder: Path, repeat: int = 1) -> dict[str, Any]:
        """One run against the table filled to ``size`` rows, or with ``size`` 0 against
        the baseline database, emptied first."""
        engine = self.engine if size else self.baseline
        if not size:
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE jobs, batches CASCADE"))
        ids = self.submit(engine, self.opts.jobs)
        procs = self.spawn(count, folder, engine)
        self.checkpoint()
        sampler = LockSampler(self.engine, self.opts.sample_ms / 1000)
        cpu_before = postgres_cpu_s(self.local)
        sampler.start()
        try:
            found = self.drain(procs, folder)
        finally:
            locks = sampler.finish()
        cpu_s = postgres_cpu_s(self.local) - cpu_before
        end = self.outcome(engine, ids)
        tx: dict[str, dict[str, list[float]]] = {}
        for w in found:
            for kind, series in w["transactions"].items():
                into = tx.setdefault(kind, {})
                for key, values in series.items():
                    into.setdefault(key, []).extend(values)
        done = end["done"]
        return {
            "rows": size,
            "workers": count,
            "repeat": repeat,
            "submitted": len(ids),
            "done": done,
            "jobs_per_s": round(done / end["span_s"], 1) if end["span_s"] else None,
            "span_s": round(end["span_s"], 3),
            "claim": _tx_summary(**tx["claim"]) if "claim" in tx else None,
            "complete": _tx_summary(**tx["complete"]) if "complete" in tx else None,
            "lock_wait": {
                **locks,
                "ms_per_job": round(1000 * locks["total_s"] / done, 3) if done else None,
            },
            "postgres_cpu_ms_per_job": round(1000 * cpu_s / done, 3) if done else None,
            "batches": sum(w["batches"] for w in found),
        }


def run_scale(opts: ScaleOptions, settings: Settings, argv: list[str]) -> dict[str, Any]:
    """Start Postgres, Redis and S3, fill and measure at each size, stop everything;
    write and return the report (a failure keeps what was measured before it)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    local = LocalStack(settings.data_dir / "bench-scale")
    result: dict[str, Any] = {
        "command": argv,
        "started_at": report.now(),
        "machine": report.machine_info(settings.device),
        "options": {k: report.plain(v) for k, v in asdict(opts).items()},
        "busy": scale_report.busy(),
        "fills": [],
        "runs": [],
    }
    try:
        with report.status("starting Postgres, Redis and SeaweedFS..."):
            try:
                local.start()
            except (RuntimeError, TimeoutError) as exc:
                raise BenchFailed("start-up", f"{exc}; logs under {local.root}") from exc
            run_migrations(local.database_url)
        bench = ScaleBench(opts, local, settings)
        with bench.engine.begin() as conn:  # a previous run's stack is reused: start empty
            conn.execute(text("TRUNCATE jobs, batches CASCADE"))
        bench.redis.flushall()
        logs = local.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # A shared VM's speed drifts (2x within ten minutes, seen on the project's VM), so
        # each run against a filled table is paired with one against an empty table run
        # just before it, in another database of the same server, and the ratio is taken
        # pair by pair; worker counts are interleaved for the same reason.
        for size in sorted(s for s in opts.sizes if s):
            with report.status(f"filling jobs to {size:,} rows..."):
                fill = fill_to(bench.engine, size, opts.fill_chunk, opts.events_per_job)
                result["fills"].append(fill)
            for repeat in range(1, opts.repeat + 1):
                for count in opts.workers:
                    for rows in (0, size):
                        row = {**bench.run(rows, count, logs, repeat), "paired_with": size}
                        result["runs"].append(row)
                        scale_report.progress(row)
        # Gigabytes of filler would stay on disk under the data dir until the next run.
        with bench.engine.begin() as conn:
            conn.execute(text("TRUNCATE jobs, batches CASCADE"))
    except BenchFailed as exc:
        result["error"] = str(exc)
        raise
    finally:
        with report.status("stopping every process the bench started..."):
            local.stop()
        result["finished_at"] = report.now()
        result["targets"] = scale_report.targets(result["runs"])
        scale_report.write(result, opts.out)
    return result
