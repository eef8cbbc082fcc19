"""What ``hepato bench e2e`` shows and writes: rich tables as it goes, the ratios and
targets of issue 6 (those of issue 15 and the realtime scenario's table are
hepato.bench.realtime's), the JSON report and the PNG plots. Nothing here measures."""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hepato.bench import realtime
from hepato.common import cpus
from hepato.common.settings import REPO_ROOT

console = Console(width=None if sys.stdout.isatty() else 140)
REPORT_NAME = "bench-e2e.json"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def plain(value: Any) -> Any:
    """JSON-ready: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


# --- the machine ----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _gpu(device: str) -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {
        "name": torch.cuda.get_device_name(),
        "count": torch.cuda.device_count(),
        "used": not device.startswith("cpu"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def _onnxruntime() -> dict[str, Any] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return {"version": ort.__version__, "providers": ort.get_available_providers()}


def machine_info(device: str) -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        # What the run could use (its CPU affinity: a container's cpuset is often fewer).
        "usable_cores": cpus.usable(),
        "memory_gib": _memory_gib(),
        "gpu": _gpu(device),
        "onnxruntime": _onnxruntime(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": _git(),
    }


# --- ratios and targets -------------------------------------------------------------------
def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _speed(row: dict[str, Any]) -> float:
    return float(row.get("images_per_s") or 0.0)


def ratios(scenario: str, found: dict[str, Any]) -> dict[str, Any]:
    if scenario == "realtime":
        return realtime.ratios(found)
    if scenario == "overhead":
        store = _speed(found["object_store"])
        system = found["system"]
        speeds = [_speed(r) for r in system]
        return {
            "system_over_store": {str(r["workers"]): _div(_speed(r), store) for r in system},
            "over_one_worker": {str(r["workers"]): _div(_speed(r), speeds[0]) for r in system},
            "adding_a_worker_never_lowers": all(b >= a for a, b in itertools.pairwise(speeds)),
        }
    if scenario == "efficiency":
        runs = found["runs"]
        ratios = {str(r["input_size"]): _div(_speed(r["e2e"]), _speed(r["bare"])) for r in runs}
        # The workers alone (queue filled before they start): what the worker pipeline
        # delivers of the bare model, with no uploads sharing the machine.
        ratios.update(
            {
                f"{r['input_size']} drain": _div(_speed(r["drain"]), _speed(r["bare"]))
                for r in runs
                if "drain" in r
            }
        )
        return ratios
    if scenario == "batching":
        null_ratios: dict[str, float | None] = {}
        for wait in sorted({r["max_wait_ms"] for r in found["null"]}):
            rows = sorted(
                (r for r in found["null"] if r["max_wait_ms"] == wait),
                key=lambda r: r["max_batch_size"],
            )
            key = f"batch {rows[-1]['max_batch_size']} / batch {rows[0]['max_batch_size']}"
            null_ratios[f"wait {wait:g} ms: {key}"] = _div(_speed(rows[-1]), _speed(rows[0]))
        drained = sorted(found.get("null_workers_alone", []), key=lambda r: r["max_batch_size"])
        if len(drained) > 1:
            key = f"batch {drained[-1]['max_batch_size']} / batch {drained[0]['max_batch_size']}"
            null_ratios[f"workers alone: {key}"] = _div(_speed(drained[-1]), _speed(drained[0]))
        out: dict[str, Any] = {"null": null_ratios}
        model, bare = found["model"], found["bare"]
        if len(model) > 1 and len(bare) > 1:
            e2e = _div(_speed(model[-1]), _speed(model[0]))
            alone = _div(_speed(bare[-1]), _speed(bare[0]))
            out["model"] = {
                "e2e_batched_over_unbatched": e2e,
                "bare_batched_over_unbatched": alone,
                "e2e_gain_over_bare_gain": _div(e2e, alone),
            }
        return out
    return {}


def _target(name: str, value: float | bool | None, goal: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "met": met, "issue": 6}


def targets(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratio targets of issues 6 and 15 that this run measured, each with its figure."""
    out = []
    if "efficiency" in scenarios:
        for size, r in scenarios["efficiency"]["ratios"].items():
            if size.endswith("drain"):
                name = f"workers alone (queue filled first) / bare model, {size[:-6]} px"
            else:
                name = f"e2e / bare model, {size} px"
            out.append(_target(name, r, ">= 0.9", _ge(r, 0.9)))
    if "batching" in scenarios:
        found = scenarios["batching"]["ratios"]
        m = found.get("model", {}).get("e2e_gain_over_bare_gain")
        out.append(_target("e2e batching gain / bare gain", m, ">= 0.9", _ge(m, 0.9)))
        for key, r in found["null"].items():
            out.append(_target(f"null model, {key}", r, ">= 3", _ge(r, 3.0)))
    if "overhead" in scenarios:
        found = scenarios["overhead"]["ratios"]
        for workers, r in found["system_over_store"].items():
            out.append(
                _target(
                    f"null model system / store alone, {workers} workers", r, ">= 0.8", _ge(r, 0.8)
                )
            )
        never = found["adding_a_worker_never_lowers"]
        out.append(_target("adding a worker never lowers throughput", never, "true", never))
    return out + realtime.targets(scenarios)


def _ge(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


# --- the console ------------------------------------------------------------------------
@contextmanager
def status(message: str) -> Iterator[None]:
    with console.status(message):
        yield


def heading(scenario: str) -> None:
    console.rule(f"[bold]scenario {scenario}")


def drift(scenario: str, what: str, bare: dict[str, Any]) -> None:
    """How far the bare model moved between its runs before and after (bench.bare.bracketed)."""
    if bare.get("drift") is not None:
        console.print(
            f"  {scenario}: {what}: bare model {bare['images_per_s_before']:.1f} images/s "
            f"before, {bare['images_per_s_after']:.1f} after (x{bare['drift']:.2f}); "
            "ratios against their mean"
        )


def progress(scenario: str, what: str, row: dict[str, Any], bare: float | None = None) -> None:
    lat = row.get("latency_ms") or {}
    extra = f", bare model {bare:.1f} images/s" if bare is not None else ""
    fail = f", [red]{row['failures']} failed[/]" if row.get("failures") else ""
    if "submit_seconds" in row:
        extra = f", all submitted after {row['submit_seconds']:.2f}s{extra}"
    console.print(
        f"  {scenario}: {what}: {row['images']} images in {row['seconds']:.2f}s = "
        f"[bold]{row['images_per_s']:.1f} images/s[/], p50 {lat.get('p50', '-')} ms, "
        f"p95 {lat.get('p95', '-')} ms{fail}{extra}"
    )
    if row.get("cpu_ms_per_image"):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_ms_per_image"].items() if v)
        console.print(f"    CPU ms per image: {parts}")


def _lat(row: dict[str, Any], key: str, field: str = "latency_ms") -> str:
    lat = row.get(field) or {}
    return f"{lat[key]:.0f}" if key in lat else "-"


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(scenario: str, found: dict[str, Any]) -> None:
    if scenario == "realtime":
        realtime.table(found, console)
    elif scenario == "load":
        t = Table(title=f"load sweep: {found['settings']['model']}, single images")
        for col in ("clients", "images", "images/s", "p50 ms", "p95 ms", "p99 ms", "failures"):
            t.add_column(col, justify="right")
        for r in found["singles"]:
            t.add_row(
                str(r["concurrency"]),
                str(r["images"]),
                _f(r["images_per_s"]),
                _lat(r, "p50"),
                _lat(r, "p95"),
                _lat(r, "p99"),
                str(r["failures"]),
            )
        console.print(t)
        t = Table(title="load sweep: batches (latency of a whole batch)")
        for col in ("clients", "images/batch", "images/s", "p50 ms", "p95 ms", "p99 ms", "fail"):
            t.add_column(col, justify="right")
        for r in found["batches"]:
            t.add_row(
                str(r["concurrency"]),
                str(r["batch_images"]),
                _f(r["images_per_s"]),
                _lat(r, "p50", "batch_latency_ms"),
                _lat(r, "p95", "batch_latency_ms"),
                _lat(r, "p99", "batch_latency_ms"),
                str(r["failures"]),
            )
        console.print(t)
    elif scenario == "overhead":
        ratio = found["ratios"]["system_over_store"]
        t = Table(title="pipeline overhead: null model against the object store alone")
        for col in ("run", "images/s", "p50 ms", "p95 ms", "/ store alone", "failures"):
            t.add_column(col, justify="right")
        for r in found["system"]:
            t.add_row(
                f"{r['workers']} worker(s)",
                _f(r["images_per_s"]),
                _lat(r, "p50"),
                _lat(r, "p95"),
                _f(ratio[str(r["workers"])], 2),
                str(r["failures"]),
            )
        s = found["object_store"]
        t.add_row(
            "store alone (PUT+GET)",
            _f(s["images_per_s"]),
            _lat(s, "p50"),
            _lat(s, "p95"),
            "1.00",
            str(s["failures"]),
        )
        console.print(t)
    elif scenario == "efficiency":
        st = found["settings"]
        t = Table(
            title=f"efficiency: {st['model']}, batch {st['batch']}, {st['workers']} worker(s)"
        )
        cols = ("input px", "e2e images/s", "workers alone", "bare images/s", "e2e / bare")
        for col in (*cols, "workers alone / bare", "failures"):
            t.add_column(col, justify="right")
        for r in found["runs"]:
            drain = r.get("drain") or {}
            t.add_row(
                str(r["input_size"]),
                _f(r["e2e"]["images_per_s"]),
                _f(drain.get("images_per_s")),
                _f(r["bare"]["images_per_s"]),
                _f(found["ratios"][str(r["input_size"])], 2),
                _f(found["ratios"].get(f"{r['input_size']} drain"), 2),
                str(r["e2e"]["failures"] + drain.get("failures", 0)),
            )
        console.print(t)
    elif scenario == "batching":
        t = Table(title="batch-size study (one worker)")
        for col in ("model", "max batch", "wait ms", "images/s", "mean batch", "p50 ms", "p95 ms"):
            t.add_column(col, justify="right")
        for label, rows in (("null", found["null"]), (found["settings"]["model"], found["model"])):
            for r in rows:
                mean = (r.get("model_batch_size") or {}).get("mean")
                t.add_row(
                    label,
                    str(r["max_batch_size"]),
                    f"{r['max_wait_ms']:g}",
                    _f(r["images_per_s"]),
                    _f(mean, 2),
                    _lat(r, "p50"),
                    _lat(r, "p95"),
                )
        for b in found["bare"]:
            t.add_row(
                f"{b['model']} bare", str(b["batch"]), "-", _f(b["images_per_s"]), "-", "-", "-"
            )
        console.print(t)
        console.print(f"  ratios: {json.dumps(found['ratios'])}")


def print_targets(found: list[dict[str, Any]]) -> None:
    if not found:
        return
    t = Table(title="targets (figures from this run)")
    for col in ("issue", "target", "value", "goal", "met"):
        t.add_column(col)
    for row in found:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[row["met"]]
        value = row["value"]
        cells = (row["target"], "-" if value is None else str(value), row["goal"], met)
        t.add_row(str(row.get("issue", "")), *cells)
    console.print(t)


# --- files -----------------------------------------------------------------------------
def write(result: dict[str, Any], out: Path) -> list[Path]:
    """The JSON report and a plot per scenario that ran; returns the files written."""
    from hepato.bench import plots as bench_plots

    out.mkdir(parents=True, exist_ok=True)
    report = out / REPORT_NAME
    try:
        plots = bench_plots.draw(result["scenarios"], out)
    except RuntimeError as exc:  # no matplotlib: the figures are still in the JSON
        console.print(f"[yellow]{exc}")
        plots = []
    written = [report, *plots]
    result["files"] = [str(p) for p in written]
    report.write_text(json.dumps(plain(result), indent=2) + "\n")
    return written
