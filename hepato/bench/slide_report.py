"""What ``hepato bench slides`` shows: its ratios and targets, progress lines as it goes
and the tables at the end. Nothing here measures (hepato.bench.slides does)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from hepato.bench.cpu import PARTS
from hepato.bench.report import console

# Targets of the whole-slide path, each a ratio taken within one run.
GOALS = {"slide_over_bare": 0.85, "slide_over_images": 1.0, "memory_double_over_single": 1.10}
_NAMES = {
    "slide_over_bare": ("slide through the service / bare model, tiles/s", ">="),
    "slide_over_images": ("slide / the same tiles as single images, per tile", ">="),
    "memory_double_over_single": ("worker peak RSS, slide of twice the area / slide", "<="),
}


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _peak(slide: dict[str, Any]) -> float | None:
    memory = slide.get("worker_memory") or {}
    value = (memory.get("after_slide") or {}).get("peak_rss_mb")
    return float(value) if value is not None else None


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    service = result.get("service", {}).get("tiles_per_s")
    slides = result.get("slides", {})
    return {
        "slide_over_bare": _div(service, result.get("bare", {}).get("tiles_per_s")),
        "slide_over_images": _div(service, result.get("images", {}).get("images_per_s")),
        "memory_double_over_single": _div(
            _peak(slides.get("double", {})), _peak(slides.get("single", {}))
        ),
    }


def targets(found: dict[str, float | None]) -> list[dict[str, Any]]:
    out = []
    for key, (name, op) in _NAMES.items():
        value, goal = found.get(key), GOALS[key]
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": name, "value": value, "goal": f"{op} {goal:g}", "met": met})
    return out


def _cpu(row: dict[str, Any], key: str) -> str:
    cpu = row.get(key) or {}
    if not cpu:
        return "-"
    parts = " · ".join(f"{cpu.get(p, 0.0):.1f}" for p in PARTS)
    return f"{parts} = {cpu.get('total', 0.0):.1f}"


def progress(what: str, row: dict[str, Any]) -> None:
    count = row.get("tiles", row.get("images", 0))
    speed = row.get("tiles_per_s", row.get("images_per_s", 0.0))
    fail = f", [red]{row['failures']} failed[/]" if row.get("failures") else ""
    seconds = row.get("seconds", row.get("model_seconds", 0.0))
    console.print(
        f"  slides: {what}: {count} tiles in {seconds:.1f}s = [bold]{speed:.1f}/s[/]{fail}"
    )
    cpu = row.get("cpu_ms_per_tile") or row.get("cpu_ms_per_image")
    if cpu:
        console.print(f"    CPU ms per tile: {', '.join(f'{k} {v:.1f}' for k, v in cpu.items())}")


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(result: dict[str, Any]) -> None:
    slides = result.get("slides", {})
    single = slides.get("single", {})
    opts = result.get("options", {})
    title = (
        f"whole slide: {opts.get('model')}, {single.get('width')} x {single.get('height')} px "
        f"{single.get('format')}, 1 worker, batch {opts.get('batch')}"
    )
    t = Table(title=title)
    for col in ("path", "tiles", "seconds", "tiles/s", f"CPU ms per tile: {' · '.join(PARTS)}"):
        t.add_column(col, justify="right")
    rows = (
        ("slide through the service", result.get("service"), "tiles_per_s"),
        ("same tiles as images", result.get("images"), "images_per_s"),
        ("bare model, same tiles", result.get("bare"), "tiles_per_s"),
        ("slide of 2x area, service", result.get("service_double"), "tiles_per_s"),
    )
    for name, row, speed in rows:
        if not row:
            continue
        count = row.get("tiles", row.get("images"))
        seconds = row.get("seconds", row.get("model_seconds"))
        cpu = _cpu(row, "cpu_ms_per_tile" if "cpu_ms_per_tile" in row else "cpu_ms_per_image")
        t.add_row(name, str(count), _f(seconds), _f(row.get(speed)), cpu)
    console.print(t)
    m = Table(title="worker memory (RSS high-water mark of the worker process, MB)")
    for col in ("slide", "tiles", "after warm-up", "after the slide"):
        m.add_column(col, justify="right")
    for key, service in (("single", "service"), ("double", "service_double")):
        s = slides.get(key)
        if not s or "worker_memory" not in s:
            continue
        memory = s["worker_memory"]
        m.add_row(
            f"{s['width']} x {s['height']}",
            str((result.get(service) or {}).get("tiles", "-")),
            _f((memory.get("after_warm_up") or {}).get("peak_rss_mb")),
            _f((memory.get("after_slide") or {}).get("peak_rss_mb")),
        )
    console.print(m)
    g = Table(title="whole-slide targets (ratios from this run)")
    for col in ("target", "value", "goal", "met"):
        g.add_column(col)
    for row in result.get("targets", []):
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[row["met"]]
        value = row["value"]
        g.add_row(row["target"], "-" if value is None else f"{value:.2f}", row["goal"], met)
    console.print(g)
    console.print(f"report: {', '.join(result.get('files', []))}")
