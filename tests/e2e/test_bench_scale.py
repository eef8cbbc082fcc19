"""``hepato bench scale --quick``: it fills the jobs table in Postgres, drains every job it
submits with burst workers at each size and worker count, writes its JSON and markdown
reports with every figure and target, and leaves no process behind. Nothing here looks at
how fast anything went."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hepato.bench.scale_worker import kind_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: embedded Postgres runs as its own user (see test_up).
    with tempfile.TemporaryDirectory(prefix="hepato-scale-") as root:
        yield Path(root)


def test_the_quick_scale_bench_drains_every_job_and_reports_each_figure(data_dir: Path) -> None:
    out = data_dir / "report"
    env = {**os.environ, "HEPATO_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "hepato", "bench", "scale", "--quick", "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr

    report = json.loads((out / "bench-scale.json").read_text())
    assert report["command"] == ["hepato", "bench", "scale", "--quick", "--out", str(out)]
    assert [f["rows"] for f in report["fills"]] == [20_000]
    # One job_events row per filler job, besides the events of the submitted jobs.
    assert report["fills"][0]["job_events_rows"] >= 20_000
    runs = report["runs"]
    # Each run on the filled table just after one on the empty (baseline) table.
    assert [(r["rows"], r["workers"], r["paired_with"]) for r in runs] == [
        (0, 1, 20_000),
        (20_000, 1, 20_000),
        (0, 2, 20_000),
        (20_000, 2, 20_000),
    ]
    for run in runs:
        assert run["submitted"] == run["done"] == 300
        assert run["jobs_per_s"] > 0
        for kind in ("claim", "complete"):
            assert run[kind]["count"] >= 1
            assert run[kind]["p99_ms"] >= run[kind]["p50_ms"] > 0
        # The jobs table is written by one statement per microbatch complete.
        assert run["complete"]["jobs_write_statements"] == [1]
        assert run["claim"]["jobs_write_statements"] == [1]
        lock = run["lock_wait"]
        assert lock["samples"] > 0 and lock["total_s"] >= lock["event_log_lock_s"] >= 0
        assert run["postgres_cpu_ms_per_job"] > 0
    names = [t["target"] for t in report["targets"]]
    assert names[0].startswith("throughput at 20,000 rows / at 0 rows")
    assert names[1].startswith("heavyweight lock wait ms/job, 1 -> 2 workers")
    assert names[2].startswith("latch (LWLock) wait ms/job, 1 -> 2 workers")
    assert "write statements to jobs per microbatch complete" in names
    assert all(t["met"] in (True, False) for t in report["targets"])

    markdown = (out / "bench-scale.md").read_text()
    assert "| rows | workers | done | jobs/s |" in markdown
    assert markdown.count("| 300/300 |") == 4
    assert "claim + complete against a filled jobs table" in result.stdout
    left = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if str(data_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left


def test_transactions_are_told_apart_by_their_update_of_jobs() -> None:
    claim = "UPDATE jobs SET state=%(state)s, attempts=(jobs.attempts + %(a)s), lease_token=%(t)s"
    complete = "UPDATE jobs SET state=%(state)s, finished_at=now(), result=anon_1.result FROM"
    insert = "INSERT INTO job_events (job_id) SELECT jobs.id FROM jobs"
    assert kind_of(["SELECT jobs.id FROM jobs", claim, insert]) == "claim"
    assert kind_of([complete, insert]) == "complete"
    # A sweep's or a failure's write touches the lease too, and is neither.
    sweep = "UPDATE jobs SET state=%(state)s, lease_token=%(t)s, lease_until=%(u)s WHERE"
    assert kind_of([sweep, insert]) is None
    assert kind_of(["UPDATE jobs SET lease_until=now() WHERE jobs.id = 1", insert]) is None
