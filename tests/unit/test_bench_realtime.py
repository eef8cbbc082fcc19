"""The realtime scenario's figures, from hand-made measurements: stage medians, ratios
against the bare model, the targets of issue 15, and its tables. Nothing here runs a
stack or a model."""

from __future__ import annotations

from typing import Any

import pytest

from hepato.bench import realtime, report
from hepato.bench.detect import _stages
from hepato.bench.options import SCENARIOS, BenchOptions, scenario_names


def lat(p50: float, p99: float) -> dict[str, float]:
    return {"p50": p50, "p95": (p50 + p99) / 2, "p99": p99, "mean": p50, "max": p99}


def bare_row(batch: int, images_per_s: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {"batch": batch, "images_per_s": images_per_s, "cpu_ms_per_image": cpu, **extra}


CPU = {"gateway": 4.0, "workers": 20.0, "seaweedfs": 3.0, "bench client": 9.0, "total": 36.0}


def scenario(stages: bool = True) -> dict[str, Any]:
    detect: list[dict[str, Any]] = [
        {
            "concurrency": 1,
            "images": 30,
            "failures": 0,
            "seconds": 3.0,
            "images_per_s": 10.0,
            "latency_ms": lat(25.0, 60.0),
            "cpu_ms_per_image": CPU,
        },
        {"concurrency": 4, "images_per_s": 60.0, "failures": 0, "latency_ms": lat(60, 90)},
        {"concurrency": 16, "images_per_s": 50.0, "failures": 1, "latency_ms": lat(300, 400)},
    ]
    if stages:
        detect[0]["stages_ms"] = {"queue": 2.0, "inference": 12.0, "other": 3.0}
    found = {
        "settings": {"model": "m-bench-320", "input_size": 320, "cpu_threads": 2},
        "bare": {
            "batch 1": bare_row(1, 80.0, 18.0, latency_ms=lat(12.0, 14.0)),
            "batch 4": bare_row(4, 70.0, 16.0),
            "batch 16": bare_row(16, 100.0, 15.0),
        },
        "detect": detect,
    }
    found["ratios"] = realtime.ratios(found)
    return found


def test_stage_medians_follow_the_request_and_skip_what_is_missing() -> None:
    rows = [
        {"other": 3.0, "inference": 10.0, "queue": 1.0},
        {"inference": 14.0, "queue": 5.0, "novel": 2.0},
        {"inference": 12.0, "upload": 4.0, "to_write": 0.5},
    ]
    found = realtime.stage_medians(rows)
    assert list(found) == ["upload", "queue", "inference", "to_write", "other", "novel"]
    assert found == {
        "upload": 4.0,
        "queue": 3.0,
        "inference": 12.0,
        "to_write": 0.5,
        "other": 3.0,
        "novel": 2.0,
    }
    assert realtime.stage_medians([]) == {}


def test_stages_are_read_from_the_answer_only_when_it_has_them() -> None:
    assert _stages({"job_id": "x"}) is None
    assert _stages({"stages_ms": None}) is None
    assert _stages({"stages_ms": {}}) == {}
    assert _stages({"stages_ms": {"queue": 1, "inference": 2.5, "odd": "x"}}) == {
        "queue": 1.0,
        "inference": 2.5,
    }


def test_the_stack_cpu_leaves_out_the_client_and_the_model() -> None:
    assert realtime.stack_cpu_ms(CPU) == 27.0
    assert realtime.stack_cpu_ms({}) is None
    assert realtime.outside_model_ms(CPU, {"cpu_ms_per_image": 18.0}) == 9.0
    assert realtime.outside_model_ms(CPU, {}) is None


def test_ratios_set_each_concurrency_against_the_bare_model_at_that_batch() -> None:
    r = scenario()["ratios"]
    assert r["p50_minus_bare_p50_ms"] == 13.0
    assert r["p99_minus_bare_p50_ms"] == 48.0
    assert r["over_bare_same_batch"] == {"1": 0.125, "4": pytest.approx(0.857), "16": 0.5}
    assert r["cpu_ms_outside_model"] == {"1": 9.0, "4": None, "16": None}


def test_ratios_without_a_concurrency_one_run_are_none() -> None:
    found = scenario()
    found["detect"] = found["detect"][1:]
    r = realtime.ratios(found)
    assert r["p50_minus_bare_p50_ms"] is None and r["p99_minus_bare_p50_ms"] is None
    assert set(r["over_bare_same_batch"]) == {"4", "16"}


def efficiency() -> dict[str, Any]:
    runs = [
        {
            "input_size": size,
            "e2e": {"images_per_s": e2e, "cpu_ms_per_image": CPU},
            "drain": {"images_per_s": drain},
            "bare": {"images_per_s": 100.0, "cpu_ms_per_image": 22.0},
        }
        for size, e2e, drain in ((320, 80.0, 90.0), (640, 70.0, 80.0))
    ]
    found: dict[str, Any] = {"settings": {}, "runs": runs}
    found["ratios"] = report.ratios("efficiency", found)
    return found


def test_the_targets_of_issue_15() -> None:
    rows = realtime.targets({"realtime": scenario(), "efficiency": efficiency()})
    got = {r["target"]: (r["value"], r["goal"], r["met"]) for r in rows}
    assert all(r["issue"] == 15 for r in rows)
    assert got == {
        "detect p50 at 1 client above bare batch-1 p50, 320 px, ms": (13.0, "<= 15", True),
        "detect p99 at 1 client above bare batch-1 p50, 320 px, ms": (48.0, "<= 40", False),
        "detect images/s, 4 clients / bare batch 4, 320 px": (
            pytest.approx(0.857),
            ">= 0.8",
            True,
        ),
        "detect images/s, 16 clients / bare batch 16, 320 px": (0.5, ">= 0.8", False),
        "e2e / bare model, 320 px": (0.8, ">= 0.75", True),
        "e2e / bare model, 640 px": (0.7, ">= 0.75", False),
        "workers alone (queue filled first) / bare model, 320 px": (0.9, ">= 0.85", True),
        "workers alone (queue filled first) / bare model, 640 px": (0.8, ">= 0.85", False),
        "stack CPU ms per image outside the model, e2e, 320 px": (5.0, "<= 6", True),
    }


def test_a_report_without_either_scenario_has_no_issue_15_targets() -> None:
    assert realtime.targets({}) == []
    rows = report.targets({"realtime": scenario()})
    assert {r["issue"] for r in rows} == {15}
    rows = report.targets({"efficiency": efficiency()})
    assert {r["issue"] for r in rows} == {6, 15}


def test_realtime_is_scenario_e_and_runs_by_default() -> None:
    assert scenario_names(["e"]) == ("realtime",)
    assert scenario_names(["a,e"]) == ("load", "realtime")
    assert scenario_names(None) == SCENARIOS
    assert "realtime" in SCENARIOS


@pytest.mark.parametrize("stages", [True, False])
def test_the_tables_print_with_or_without_stages(stages: bool) -> None:
    with report.console.capture() as captured:
        report.table("realtime", scenario(stages))
        report.print_targets(realtime.targets({"realtime": scenario(stages)}))
    text = captured.get()
    assert "detect, 16 clients" in text and "bare, batch 4" in text
    assert ("one request's stages" in text) is stages
    assert ("carry no stages_ms" in text) is not stages


def test_the_bare_model_is_the_mean_of_its_runs_before_and_after() -> None:
    """A ratio is set against the bare model measured at both ends of what it compares
    (the VM drifts within a run); the drift itself is kept for the report."""
    from hepato.bench.bare import bracketed

    before = bare_row(1, 80.0, 20.0, latency_ms={**lat(10.0, 14.0), "count": 400}, model="m")
    after = bare_row(1, 60.0, 24.0, latency_ms={**lat(12.0, 20.0), "count": 300}, model="m")
    row = bracketed(before, after)
    assert (row["images_per_s"], row["cpu_ms_per_image"], row["model"]) == (70.0, 22.0, "m")
    assert row["latency_ms"] == {
        "p50": 11.0,
        "p95": 14.0,
        "p99": 17.0,
        "mean": 11.0,
        "max": 20.0,
        "count": 700,
    }
    assert (row["images_per_s_before"], row["images_per_s_after"], row["drift"]) == (
        80.0,
        60.0,
        0.75,
    )
    # Throughput rows (no latencies) as well.
    assert bracketed({"images_per_s": 50.0}, {"images_per_s": 50.0})["drift"] == 1.0


def test_realtime_workers_reach_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from hepato.bench import cli, e2e

    seen: list[BenchOptions] = []

    def fake_run(opts: BenchOptions, *_: object) -> dict[str, object]:
        seen.append(opts)
        return {"targets": [], "files": []}

    monkeypatch.setattr(e2e, "run_bench", fake_run)
    args = ["e2e", "--only", "realtime", "--realtime-workers", "2", "--model-cpus", "1"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert seen[0].realtime_workers == 2 and BenchOptions().realtime_workers == 1
    assert seen[0].model_cpus == "1" and BenchOptions().model_cpus == ""
    refused = CliRunner().invoke(cli.app, ["e2e", "--realtime-workers", "0"])
    assert refused.exit_code != 0
    for bad, named in (("1-", "not a CPU list"), ("4096", "may not use")):
        refused = CliRunner().invoke(cli.app, ["e2e", "--model-cpus", bad])
        assert refused.exit_code != 0 and named in refused.output, refused.output
    assert len(seen) == 1, "refused before the bench ran"
