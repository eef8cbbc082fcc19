"""The PNG plots of ``hepato bench e2e`` (matplotlib, Agg: no display needed). One file
per scenario that ran; each takes the scenario's part of the JSON report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_FILES = {
    "load": "load-sweep.png",
    "overhead": "overhead.png",
    "efficiency": "efficiency.png",
    "batching": "batch-size-study.png",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(
            "the plots need matplotlib: pip install 'hepato[bench]'; the JSON report is written"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lat(rows: list[dict[str, Any]], key: str, field: str = "latency_ms") -> list[float]:
    return [float((r.get(field) or {}).get(key, float("nan"))) for r in rows]


def _speeds(rows: list[dict[str, Any]]) -> list[float]:
    return [float(r["images_per_s"]) for r in rows]


def _load(found: dict[str, Any], plt: Any) -> Any:
    rows = found["singles"]
    x = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(x, _speeds(rows), "o-", label="single images")
    for b in found["batches"]:
        left.axhline(
            b["images_per_s"], ls="--", lw=1, color="grey", alpha=0.4 + 0.15 * b["concurrency"] / 4
        )
        left.annotate(
            f"{b['batch_images']}-image batches, {b['concurrency']} client(s)",
            (x[0], b["images_per_s"]),
            fontsize=7,
            va="bottom",
        )
    left.set(xlabel="concurrent clients", ylabel="images/s", title="throughput")
    right.plot(x, _lat(rows, "p50"), "o-", label="p50")
    right.plot(x, _lat(rows, "p95"), "s-", label="p95")
    right.set(xlabel="concurrent clients", ylabel="ms, submit to done seen", title="latency")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    right.set_yscale("log")
    fig.suptitle(f"load sweep: {found['settings']['model']}, {found['settings']['workers']} worker")
    return fig


def _overhead(found: dict[str, Any], plt: Any) -> Any:
    rows = found["system"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    x = [r["workers"] for r in rows]
    ax.plot(x, _speeds(rows), "o-", label="null model, whole system")
    ax.axhline(found["object_store"]["images_per_s"], ls="--", color="C3", label="store alone")
    ax.set(xlabel="workers", ylabel="images/s", title="pipeline overhead (null model)")
    ax.set_xticks(x)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _efficiency(found: dict[str, Any], plt: Any) -> Any:
    runs = found["runs"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    x = range(len(runs))
    ax.bar([i - 0.27 for i in x], [r["e2e"]["images_per_s"] for r in runs], 0.27, label="e2e")
    drained = [(r.get("drain") or {}).get("images_per_s", 0.0) for r in runs]
    ax.bar(list(x), drained, 0.27, label="workers alone (queue filled first)")
    ax.bar([i + 0.27 for i in x], [r["bare"]["images_per_s"] for r in runs], 0.27, label="bare")
    for i, r in enumerate(runs):
        ratio = found["ratios"].get(str(r["input_size"]))
        if ratio is not None:
            top = max(r["bare"]["images_per_s"], r["e2e"]["images_per_s"])
            ax.annotate(f"e2e/bare {ratio:.2f}", (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"{r['input_size']} px" for r in runs])
    st = found["settings"]
    ax.set(ylabel="images/s", title=f"{st['model']}, batch {st['batch']}: e2e against bare")
    ax.legend(fontsize=8)
    return fig


def _batching(found: dict[str, Any], plt: Any) -> Any:
    fig, (tp, lat, model) = plt.subplots(1, 3, figsize=(15, 4.2))
    null = found["null"]
    for i, wait in enumerate(sorted({r["max_wait_ms"] for r in null})):
        rows = sorted(
            (r for r in null if r["max_wait_ms"] == wait), key=lambda r: r["max_batch_size"]
        )
        x = [r["max_batch_size"] for r in rows]
        tp.plot(x, _speeds(rows), "o-", color=f"C{i}", label=f"wait {wait:g} ms")
        lat.plot(x, _lat(rows, "p50"), "o-", color=f"C{i}", label=f"p50, wait {wait:g} ms")
        lat.plot(x, _lat(rows, "p95"), "s--", color=f"C{i}", label=f"p95, wait {wait:g} ms")
    for ax in (tp, lat):
        ax.set_xscale("log", base=2)
        xs = sorted({r["max_batch_size"] for r in null})
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel("max_batch_size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    tp.set(ylabel="images/s", title="null model: throughput")
    lat.set(ylabel="ms, submit to done seen", title="null model: latency")
    rows, bare = found["model"], found["bare"]
    labels = [f"batch {r['max_batch_size']}" for r in rows]
    at = list(range(len(rows)))
    model.bar([i - 0.2 for i in at], _speeds(rows), 0.4, label="e2e")
    if len(bare) == len(rows):
        model.bar([i + 0.2 for i in at], _speeds(bare), 0.4, label="bare")
    model.set_xticks(at, labels)
    model.set(ylabel="images/s", title=f"{found['settings']['model']}: batched and not")
    model.legend(fontsize=8)
    return fig


DRAW = {"load": _load, "overhead": _overhead, "efficiency": _efficiency, "batching": _batching}


def draw(scenarios: dict[str, Any], out: Path) -> list[Path]:
    if not scenarios:
        return []
    plt = _pyplot()
    written = []
    for name, found in scenarios.items():
        if name not in DRAW:  # realtime: its tables say it all
            continue
        fig = DRAW[name](found, plt)
        fig.tight_layout()
        path = out / PLOT_FILES[name]
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
