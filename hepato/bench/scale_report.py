"""What ``hepato bench scale`` shows and writes: a line per run as it goes, the table,
the targets of issue 18 next to this run's figures, and bench-scale.json and
bench-scale.md. Nothing here measures."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

from rich.table import Table

from hepato.bench.report import console, plain, print_targets

REPORT_NAME = "bench-scale.json"
MARKDOWN_NAME = "bench-scale.md"
# Lock wait per job may be this much above one worker's before it counts as growing,
# plus a floor for the sampling's noise (a wait shorter than the period is seen or not:
# 0.05 ms/job is five 20 ms samples over 2,000 jobs).
GROWTH_SLACK = 1.1
NOISE_MS_PER_JOB = 0.05


def busy() -> list[str]:
    """Other benchmarks or test runs on this machine while this one ran: with them, the
    figures are indicative only."""
    found = subprocess.run(
        ["pgrep", "-af", "hepato bench|pytest"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    me = os.getpid()
    return [line for line in found if line.split(" ", 1)[0] not in {str(me), str(os.getppid())}]


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tx(row: dict[str, Any], kind: str, key: str) -> float | None:
    tx = row.get(kind) or {}
    return tx.get(key)


def progress(row: dict[str, Any]) -> None:
    console.print(
        f"  scale: {_label(*_key(row)[::2])} rows, {row['workers']} workers: {row['done']} of "
        f"{row['submitted']} jobs done, [bold]{_f(row['jobs_per_s'])} jobs/s[/], claim p99 "
        f"{_f(_tx(row, 'claim', 'p99_ms'), 2)} ms, complete p99 "
        f"{_f(_tx(row, 'complete', 'p99_ms'), 2)} ms, lock wait "
        f"{_f(row['lock_wait']['total_s'], 3)} s, Postgres CPU "
        f"{_f(row['postgres_cpu_ms_per_job'], 2)} ms/job"
    )


def _target(name: str, value: Any, goal: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "met": met, "issue": 18}


Key = tuple[int, int, int]  # rows, workers, the filled size a baseline run is paired with


def _key(r: dict[str, Any]) -> Key:
    return r["rows"], r["workers"], r.get("paired_with", r["rows"])


def _label(rows: int, paired: int) -> str:
    return f"{rows:,}" if rows or rows == paired else f"0 (beside {paired:,})"


def _waits(r: dict[str, Any]) -> dict[str, float | None]:
    """Lock wait per job, all of it and split in two: heavyweight locks (``Lock: …``,
    one transaction waiting on another's row, relation or advisory lock: what a global
    ordering lock shows as) and Postgres's own latches (``LWLock: …``, mostly
    ``WALWrite``: a commit waiting for the WAL flush that group commit shares with the
    other committers, so it rises with concurrent commits on any durable server). Rows
    of reports made before the split count every kind as a lock."""
    wait, done = r["lock_wait"], r.get("done") or 0
    kinds = wait.get("by_kind_s")

    def per_job(seconds: float) -> float | None:
        return round(1000 * seconds / done, 3) if done else None

    if kinds is None:
        return {"all": wait["ms_per_job"], "locks": wait["ms_per_job"], "latches": None}
    heavy = sum(v for k, v in kinds.items() if not k.startswith("LWLock"))
    latch = sum(v for k, v in kinds.items() if k.startswith("LWLock"))
    return {"all": wait["ms_per_job"], "locks": per_job(heavy), "latches": per_job(latch)}


def medians(runs: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Per (rows, workers, paired size): the median over its repeated runs of jobs/s and
    of lock wait per job; one run of a couple of seconds on shared cores varies by a
    tenth. A baseline run (0 rows) is grouped with the filled size it was paired with."""
    grouped: dict[Key, list[dict[str, Any]]] = {}
    for r in runs:
        grouped.setdefault(_key(r), []).append(r)

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(statistics.median(known), 3) if known else None

    out = {}
    for key, group in grouped.items():
        waits = [_waits(r) for r in group]
        out[key] = {
            "runs": len(group),
            "jobs_per_s": median([r["jobs_per_s"] for r in group]),
            "lock_wait": {
                "ms_per_job": median([w["all"] for w in waits]),
                "locks_ms_per_job": median([w["locks"] for w in waits]),
                "latches_ms_per_job": median([w["latches"] for w in waits]),
            },
        }
    return out


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's three targets, each against this run's figures, the medians of repeated
    runs (met: None when the run did not measure what it needs)."""
    out = []
    by = medians(runs)
    sizes = sorted({r["rows"] for r in runs})
    counts = sorted({r["workers"] for r in runs})
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        ratios = {}
        for n in counts:
            # The empty-table runs paired with the largest size; else (runs made before
            # pairing) the smallest size's own.
            a = by.get((small, n, large)) or by.get((small, n, small))
            b = by.get((large, n, large))
            if a and b and a["jobs_per_s"] and b["jobs_per_s"]:
                ratios[n] = round(b["jobs_per_s"] / a["jobs_per_s"], 3)
        out.append(
            _target(
                f"throughput at {large:,} rows / at {small:,} rows, per worker count",
                ratios or None,
                ">= 0.9 at every worker count",
                all(v >= 0.9 for v in ratios.values()) if ratios else None,
            )
        )
    if len(counts) > 1:
        for key, what in (
            ("locks_ms_per_job", "heavyweight lock wait"),
            ("latches_ms_per_job", "latch (LWLock) wait"),
        ):
            growth = {}
            for rows, paired in sorted({(k[0], k[2]) for k in by}):
                one, most = by.get((rows, counts[0], paired)), by.get((rows, counts[-1], paired))
                if one and most:
                    growth[_label(rows, paired)] = (
                        one["lock_wait"][key],
                        most["lock_wait"][key],
                    )
            known = {s: g for s, g in growth.items() if None not in g}
            out.append(
                _target(
                    f"{what} ms/job, {counts[0]} -> {counts[-1]} workers, per size",
                    {s: f"{o} -> {m}" for s, (o, m) in known.items()} or None,
                    f"not growing (<= {GROWTH_SLACK}x, or + {NOISE_MS_PER_JOB} ms/job)",
                    all(m <= max(o * GROWTH_SLACK, o + NOISE_MS_PER_JOB) for o, m in known.values())
                    if known
                    else None,
                )
            )
    jobs_writes = sorted(
        {w for r in runs if r.get("complete") for w in r["complete"]["jobs_write_statements"]}
    )
    writes = sorted(
        {w for r in runs if r.get("complete") for w in r["complete"]["write_statements"]}
    )
    out.append(
        _target(
            "write statements to jobs per microbatch complete",
            jobs_writes or None,
            "1",
            jobs_writes == [1] if jobs_writes else None,
        )
    )
    out.append(
        _target(
            "write statements per microbatch complete, the event log's insert included",
            writes or None,
            "1",
            writes == [1] if writes else None,
        )
    )
    return out


def _table(result: dict[str, Any]) -> Table:
    t = Table(title="claim + complete against a filled jobs table (null model, burst workers)")
    cols = (
        "rows",
        "workers",
        "done",
        "jobs/s",
        "claim p99 ms",
        "complete p99 ms",
        "writes/complete",
        "lock wait s",
        "event-log lock share",
        "PG CPU ms/job",
        "run",
    )
    for col in cols:
        t.add_column(col, justify="right")
    for _, cells in _rows(result):
        t.add_row(*cells)
    return t


def _rows(result: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    rows = []
    for r in result["runs"]:
        lock = r["lock_wait"]
        share = lock["event_log_share"]
        writes = (r.get("complete") or {}).get("write_statements") or []
        rows.append(
            (
                r,
                [
                    _label(*_key(r)[::2]),
                    str(r["workers"]),
                    f"{r['done']}/{r['submitted']}",
                    _f(r["jobs_per_s"]),
                    _f(_tx(r, "claim", "p99_ms"), 2),
                    _f(_tx(r, "complete", "p99_ms"), 2),
                    "/".join(str(w) for w in writes) or "-",
                    _f(lock["total_s"], 3),
                    "-" if share is None else f"{100 * share:.0f}%",
                    _f(r["postgres_cpu_ms_per_job"], 2),
                    str(r.get("repeat", 1)),
                ],
            )
        )
    return rows


def print_report(result: dict[str, Any]) -> None:
    console.print(_table(result))
    for (rows, workers, paired), m in sorted(medians(result["runs"]).items()):
        console.print(
            f"  median of {m['runs']} run(s) at {_label(rows, paired)} rows, {workers} workers: "
            f"{_f(m['jobs_per_s'])} jobs/s, lock wait {_f(m['lock_wait']['ms_per_job'], 3)} ms/job "
            f"(locks {_f(m['lock_wait']['locks_ms_per_job'], 3)}, "
            f"latches {_f(m['lock_wait']['latches_ms_per_job'], 3)})"
        )
    print_targets(result["targets"])
    if result.get("busy"):
        console.print("[yellow]other runs on this machine meanwhile (figures indicative):")
        for line in result["busy"]:
            console.print(f"  {line}")


def markdown(result: dict[str, Any]) -> str:
    """The same table and targets as GitHub markdown, for the README."""
    head = (
        "| rows | workers | done | jobs/s | claim p99 ms | complete p99 ms | writes/complete "
        "| lock wait s | event-log lock share | PG CPU ms/job | run |"
    )
    lines = [
        f"`{' '.join(result['command'])}` on {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, {result['started_at']}",
        "",
        head,
        "|" + "---:|" * 11,
    ]
    lines += ["| " + " | ".join(cells) + " |" for _, cells in _rows(result)]
    lines += [
        "",
        "| rows | workers | runs | median jobs/s | median wait ms/job: all "
        "| heavyweight locks | latches (LWLock) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (rows, workers, paired), m in sorted(medians(result["runs"]).items()):
        lines.append(
            f"| {_label(rows, paired)} | {workers} | {m['runs']} | {_f(m['jobs_per_s'])} "
            f"| {_f(m['lock_wait']['ms_per_job'], 3)} "
            f"| {_f(m['lock_wait']['locks_ms_per_job'], 3)} "
            f"| {_f(m['lock_wait']['latches_ms_per_job'], 3)} |"
        )
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['value']} | {t['goal']} | {met} |")
    if result.get("busy"):
        lines += ["", "Other runs on the machine meanwhile: figures indicative."]
    if result.get("error"):
        lines += ["", f"Failed: {result['error']}"]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT_NAME, out / MARKDOWN_NAME]
    result["files"] = [str(p) for p in written]
    written[0].write_text(json.dumps(plain(result), indent=2) + "\n")
    written[1].write_text(markdown(result))
    return written
