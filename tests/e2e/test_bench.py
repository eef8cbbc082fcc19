"""``hepato bench e2e`` on tiny sizes: it starts its own stack, writes its report and
plots, names the scenario that failed, and leaves no process behind. Nothing here looks
at how fast anything went."""

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

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--only", "overhead", "--workers", "1", "--overhead-images", "8", "--clients", "2"]
TINY += ["--chunk", "4", "--warmup-images", "4"]


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: embedded Postgres runs as its own user (see test_up).
    with tempfile.TemporaryDirectory(prefix="hepato-bench-") as root:
        yield Path(root)


def bench(data_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEPATO_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "hepato", "bench", "e2e", "--out", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def left_behind(data_dir: Path) -> list[list[str]]:
    return [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if str(data_dir) in " ".join(p.info["cmdline"] or [])
    ]


def test_the_overhead_scenario_writes_its_report_and_plot(data_dir: Path) -> None:
    out = data_dir / "report"
    result = bench(data_dir, out, *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "bench-e2e.json").read_text())
    found = report["scenarios"]["overhead"]
    [system] = found["system"]
    assert (system["workers"], system["images"], system["failures"]) == (1, 8, 0)
    assert system["latency_ms"]["count"] == 8
    assert system["model_batch_size"]["max"] <= 32
    assert (found["object_store"]["images"], found["object_store"]["failures"]) == (8, 0)
    assert set(found["ratios"]["system_over_store"]) == {"1"}
    assert {t["target"] for t in report["targets"]} >= {"adding a worker never lowers throughput"}
    assert report["machine"]["cores"] == os.cpu_count()
    assert report["machine"]["usable_cores"] == len(os.sched_getaffinity(0))
    assert report["options"]["only"] == ["overhead"]
    assert (out / "overhead.png").read_bytes()[:8] == PNG_MAGIC
    assert "pipeline overhead" in result.stdout
    assert not left_behind(data_dir)


def test_a_failure_names_its_scenario_and_stops_everything(data_dir: Path) -> None:
    out = data_dir / "failed"
    result = bench(data_dir, out, *TINY, "--timeout-s", "0.001")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "scenario overhead: warm-up: timed out" in result.stderr
    report = json.loads((out / "bench-e2e.json").read_text())
    assert report["error"].startswith("scenario overhead:")
    assert not left_behind(data_dir)


def test_an_unknown_scenario_is_refused_before_anything_starts(data_dir: Path) -> None:
    result = bench(data_dir, data_dir / "none", "--only", "speed")
    assert result.returncode == 2
    assert "unknown scenario speed" in result.stderr


def test_the_slide_bench_reports_every_figure_of_one_run(data_dir: Path) -> None:
    out = data_dir / "slides"
    env = {**os.environ, "HEPATO_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "hepato", "bench", "slides", "--quick", "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "bench-slides.json").read_text())
    assert "error" not in report
    single, double = report["slides"]["single"], report["slides"]["double"]
    assert (single["width"], single["height"], single["format"]) == (4000, 4000, "svs")
    assert double["width"] * double["height"] >= 2 * 4000 * 4000
    service, images, bare = report["service"], report["images"], report["bare"]
    tiles = service["tiles"]
    assert tiles > 50 and service["failures"] == 0
    # The same tiles on every path; twice the area, about twice the tiles.
    assert images["images"] == bare["tiles"] == tiles and images["failures"] == 0
    assert 1.5 * tiles <= report["service_double"]["tiles"] <= 2.6 * tiles
    assert service["tiles_per_s"] > 0 and images["images_per_s"] > 0 and bare["tiles_per_s"] > 0
    assert service["detections"] > 0  # the demo detector finds the synthetic tissue's objects
    assert 1 <= service["model_batch_size"]["max"] <= bare["batch"] == 16
    assert service["planning_seconds"] >= 0 and service["tiles_seconds"] > 0
    cpu = service["cpu_ms_per_tile"]
    assert set(cpu) >= {"gateway", "workers", "seaweedfs", "postgres", "total"}
    assert cpu["workers"] > 0 and images["cpu_ms_per_image"]["gateway"] > 0
    for slide in (single, double):
        memory = slide["worker_memory"]
        idle, peak = memory["after_warm_up"]["peak_rss_mb"], memory["after_slide"]["peak_rss_mb"]
        assert 0 < idle <= peak
    assert set(report["ratios"]) == {
        "slide_over_bare",
        "slide_over_images",
        "memory_double_over_single",
    }
    assert all(v is not None and v > 0 for v in report["ratios"].values())
    assert [t["goal"] for t in report["targets"]] == [">= 0.85", ">= 1", "<= 1.1"]
    assert "whole-slide targets" in result.stdout
    assert not left_behind(data_dir)
