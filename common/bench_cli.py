"""``hepato bench``: the project's benchmark commands."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.manifest import ModelManifest, load_registry
from common.settings import REPO_ROOT, get_settings

app = typer.Typer(help="Benchmarks; figures come as ratios from one run.", no_args_is_help=True)


@app.command()
def models(
    models_dir: Annotated[
        list[Path] | None,
        typer.Option("--models-dir", help="Manifest directory; repeatable [default: settings]"),
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Only these models; repeatable")
    ] = None,
    batch: Annotated[
        list[int] | None, typer.Option("--batch", "-b", help="Microbatch sizes [default: 1 8]")
    ] = None,
    seconds: Annotated[float, typer.Option(help="Least time per measurement, s")] = 3.0,
    calls: Annotated[int, typer.Option(help="Least model calls per measurement")] = 3,
    samples: Annotated[Path, typer.Option(help="Folder of input images")] = REPO_ROOT / "samples",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write results here")] = None,
) -> None:
    """Bare-model images/s at each microbatch size, for every model with weights present."""
    from worker.backends.base import Runtime
    from worker.bench import bench_models, sample_images

    settings = get_settings()
    registry: dict[str, ModelManifest] = {}
    for directory in models_dir or [settings.models_dir]:
        registry.update(load_registry(directory))
    chosen = [registry[n] for n in model] if model else list(registry.values())
    present = [m for m in chosen if m.weights_present]
    for m in chosen:
        if not m.weights_present:
            typer.echo(f"skipping {m.name}: weights missing at {m.weights_path}", err=True)
    batches = batch or [1, 8]
    runtime = Runtime(settings.device, settings.cpu_threads, settings.ultralytics_dir)
    results = bench_models(
        present,
        runtime,
        sample_images(samples),
        batches,
        min_seconds=seconds,
        min_calls=calls,
    )
    device = _device(settings.device)
    table = Table(title=f"bare model images/s on {device}")
    for col in ("model", "task", "backend", "input", *[f"batch {b}" for b in batches]):
        table.add_column(col)
    if len(batches) > 1:
        table.add_column(f"batch {batches[-1]} / batch {batches[0]}")
    rows: dict[str, list[float]] = {}
    for r in results:
        rows.setdefault(r.model, []).append(r.images_per_s)
    for m in present:
        speeds = rows[m.name]
        ratio = [f"{speeds[-1] / speeds[0]:.2f}x"] if len(speeds) > 1 else []
        table.add_row(
            m.name, m.task, m.backend, str(m.input_size), *[f"{s:.1f}" for s in speeds], *ratio
        )
    Console(width=160).print(table)
    if json_out:
        json_out.write_text(
            json.dumps(
                {
                    "device": device,
                    "results": [{**r.__dict__, "images_per_s": r.images_per_s} for r in results],
                },
                indent=2,
            )
        )


def _device(setting: str) -> str:
    try:
        import torch

        if torch.cuda.is_available() and not setting.startswith("cpu"):
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
