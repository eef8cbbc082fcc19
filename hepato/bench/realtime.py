"""The realtime scenario's figures (issue 15): its ratios against the bare model, its
tables, and the targets of issue 15, with those the efficiency scenario's figures give
when it ran in the same report. Nothing here measures (hepato.bench.detect does); the
console comes from hepato.bench.report, which calls this module."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from hepato.common.stages import total

# The stages of one request, in the order it goes through them (the gateway's stages_ms).
STAGES = (
    "upload",
    "queue",
    "claim",
    "head_start",
    "download",
    "decode",
    "preprocess",
    "to_model",
    "inference",
    "to_write",
    "postprocess",
    "write",
    "other",
)
# CPU the client spends is not the stack's.
NOT_THE_STACK = ("total", "bench client")


# --- pure figures -----------------------------------------------------------------------
def stage_medians(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The median of each stage over the requests that reported it, in request order
    (stages the contract does not name last, as first seen)."""
    seen: dict[str, list[float]] = {}
    for row in rows:
        for stage, ms in row.items():
            seen.setdefault(stage, []).append(float(ms))
    order = [s for s in STAGES if s in seen] + [s for s in seen if s not in STAGES]
    return {s: round(statistics.median(seen[s]), 2) for s in order}


def stack_cpu_ms(cpu: Mapping[str, float] | None) -> float | None:
    """CPU ms per image of the stack's own processes (the bench client left out)."""
    if not cpu:
        return None
    return round(sum(v for part, v in cpu.items() if part not in NOT_THE_STACK), 3)


def outside_model_ms(cpu: Mapping[str, float] | None, bare: Mapping[str, Any]) -> float | None:
    """The stack's CPU per image beyond what the bare model itself spends on it."""
    stack, model = stack_cpu_ms(cpu), bare.get("cpu_ms_per_image")
    return None if stack is None or model is None else round(stack - model, 3)


def _p(row: Mapping[str, Any] | None, key: str) -> float | None:
    lat = (row or {}).get("latency_ms") or {}
    return lat.get(key)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(found: Mapping[str, Any]) -> dict[str, Any]:
    bare = found["bare"]
    one = next((r for r in found["detect"] if r["concurrency"] == 1), None)
    bare_p50 = _p(bare.get("batch 1"), "p50")
    over_bare, outside = {}, {}
    for r in found["detect"]:
        b = bare.get(f"batch {r['concurrency']}")
        if b is not None:
            key = str(r["concurrency"])
            over_bare[key] = _div(r.get("images_per_s"), b.get("images_per_s"))
            outside[key] = outside_model_ms(r.get("cpu_ms_per_image"), b)
    return {
        "p50_minus_bare_p50_ms": _minus(_p(one, "p50"), bare_p50),
        "p99_minus_bare_p50_ms": _minus(_p(one, "p99"), bare_p50),
        "over_bare_same_batch": over_bare,
        "cpu_ms_outside_model": outside,
    }


def _target(name: str, value: float | None, goal: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "met": met, "issue": 15}


def _le(value: float | None, goal: float) -> bool | None:
    return None if value is None else value <= goal


def _ge(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def targets(scenarios: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 15 that this run measured, each with its figure."""
    out = []
    if "realtime" in scenarios:
        found = scenarios["realtime"]
        r, px = found["ratios"], found["settings"]["input_size"]
        for p, goal in (("p50", 15.0), ("p99", 40.0)):
            v = r[f"{p}_minus_bare_p50_ms"]
            name = f"detect {p} at 1 client above bare batch-1 p50, {px} px, ms"
            out.append(_target(name, v, f"<= {goal:g}", _le(v, goal)))
        for c, v in r["over_bare_same_batch"].items():
            if c != "1":
                name = f"detect images/s, {c} clients / bare batch {c}, {px} px"
                out.append(_target(name, v, ">= 0.8", _ge(v, 0.8)))
    if "efficiency" in scenarios:
        found = scenarios["efficiency"]
        for size, v in found["ratios"].items():
            if size.endswith("drain"):
                name = f"workers alone (queue filled first) / bare model, {size[:-6]} px"
                out.append(_target(name, v, ">= 0.85", _ge(v, 0.85)))
            else:
                out.append(_target(f"e2e / bare model, {size} px", v, ">= 0.75", _ge(v, 0.75)))
        for run in found["runs"]:
            if run["input_size"] == 320:
                v = outside_model_ms(run["e2e"].get("cpu_ms_per_image"), run["bare"])
                name = "stack CPU ms per image outside the model, e2e, 320 px"
                out.append(_target(name, v, "<= 6", _le(v, 6)))
    return out


# --- the console ------------------------------------------------------------------------
def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(found: Mapping[str, Any], console: Console) -> None:
    st, bare, r = found["settings"], found["bare"], found["ratios"]
    workers = st.get("workers", 1)
    pinned = f", model on cores {st['model_cpus']}" if st.get("model_cpus") else ""
    t = Table(
        title=f"real-time path: POST /v1/detect, {st['model']}, {workers} worker(s), "
        f"{st['cpu_threads']} thread(s){pinned}, against the bare model",
        caption="latency in ms; p50/p99 - bare: above the bare model's batch-1 p50; "
        "CPU ms per image: the stack's (client left out), and its part outside the model",
    )
    t.add_column("run", no_wrap=True)
    cols = ("images/s", "p50", "p95", "p99", "/ bare", "p50 - bare", "p99 - bare", "CPU ms")
    for col in (*cols, "outside model", "failures"):
        t.add_column(col, justify="right")
    bare_p50 = _p(bare.get("batch 1"), "p50")
    for d in found["detect"]:
        c = d["concurrency"]
        b = bare.get(f"batch {c}")
        if b is not None:
            t.add_row(
                f"bare, batch {c}",
                _ms(b["images_per_s"]),
                _ms(_p(b, "p50")),
                _ms(_p(b, "p95")),
                _ms(_p(b, "p99")),
                "1.00",
                *(["-"] * 2),
                _ms(b.get("cpu_ms_per_image")),
                "-",
                "-",
            )
        t.add_row(
            f"detect, {c} client{'s' if c > 1 else ''}",
            _ms(d["images_per_s"]),
            _ms(_p(d, "p50")),
            _ms(_p(d, "p95")),
            _ms(_p(d, "p99")),
            _ms(r["over_bare_same_batch"].get(str(c)), 2),
            _ms(_minus(_p(d, "p50"), bare_p50)) if c == 1 else "-",
            _ms(_minus(_p(d, "p99"), bare_p50)) if c == 1 else "-",
            _ms(stack_cpu_ms(d.get("cpu_ms_per_image"))),
            _ms(r["cpu_ms_outside_model"].get(str(c))),
            str(d["failures"]),
        )
    console.print(t)
    _stage_table(found["detect"], console)


def _stage_table(detect: Sequence[Mapping[str, Any]], console: Console) -> None:
    reported = [d for d in detect if d.get("stages_ms")]
    if not reported:
        console.print("  the answers of POST /v1/detect carry no stages_ms: no per-stage breakdown")
        return
    t = Table(title="one request's stages (stages_ms), median ms")
    t.add_column("stage", no_wrap=True)
    for d in reported:
        t.add_column(
            f"{d['concurrency']} client{'s' if d['concurrency'] > 1 else ''}", justify="right"
        )
    stages = list(stage_medians([d["stages_ms"] for d in reported]))
    for s in stages:
        t.add_row(s, *(_ms(d["stages_ms"].get(s)) for d in reported))
    # A head start's model call overlaps queue, claim and to_model (common.stages).
    t.add_row("sum of medians", *(_ms(total(d["stages_ms"])) for d in reported))
    t.add_row("client p50", *(_ms(_p(d, "p50")) for d in reported))
    console.print(t)
