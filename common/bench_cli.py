"""``hepato bench``: the project's benchmark commands."""

from __future__ import annotations

import json
import logging
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


@app.command()
def e2e(
    out: Annotated[Path, typer.Option(help="Where the JSON report and the plots go")] = REPO_ROOT
    / ".data"
    / "bench",
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Scenarios to run, repeatable or comma-separated: load, overhead, efficiency, "
            "batching (or a, b, c, d)",
            show_default="all",
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Detector of the load, efficiency, study runs")] = (
        "hepato-yolov8n"
    ),
    samples: Annotated[Path, typer.Option(help="Folder of synthetic_*.png")] = REPO_ROOT
    / "samples",
    wait: Annotated[
        str, typer.Option(help="How single-image clients see a job finish: sse or poll")
    ] = "sse",
    timeout_s: Annotated[float, typer.Option(help="Longest one measurement may take, s")] = 300.0,
    warmup_images: Annotated[int, typer.Option(help="Unmeasured images per new workers")] = 16,
    clients: Annotated[
        int, typer.Option(help="Concurrent submitters of the throughput runs and store-alone")
    ] = 8,
    chunk: Annotated[int, typer.Option(help="Images per batch request in throughput runs")] = 25,
    concurrency: Annotated[
        list[int] | None,
        typer.Option(help="load: single-image clients; repeatable", show_default="1 4 16 64"),
    ] = None,
    sweep_seconds: Annotated[float, typer.Option(help="load: seconds per concurrency")] = 15.0,
    load_workers: Annotated[int, typer.Option(help="load: workers")] = 1,
    batch_images: Annotated[int, typer.Option(help="load: images per batch")] = 100,
    batch_clients: Annotated[
        list[int] | None,
        typer.Option(help="load: concurrent batch clients; repeatable", show_default="1 4"),
    ] = None,
    batches_per_client: Annotated[int, typer.Option(help="load: batches per client")] = 2,
    workers: Annotated[
        list[int] | None,
        typer.Option(help="overhead: worker counts; repeatable", show_default="1 2 4"),
    ] = None,
    overhead_images: Annotated[int, typer.Option(help="overhead: images per run")] = 1500,
    input_size: Annotated[
        list[int] | None,
        typer.Option(help="efficiency: input sizes, px; repeatable", show_default="320 640"),
    ] = None,
    efficiency_images: Annotated[int, typer.Option(help="efficiency: images per run")] = 400,
    efficiency_batch: Annotated[int, typer.Option(help="efficiency: max_batch_size")] = 16,
    efficiency_workers: Annotated[int, typer.Option(help="efficiency: workers")] = 1,
    bare_seconds: Annotated[float, typer.Option(help="Least time per bare measurement, s")] = 5.0,
    study_batch: Annotated[
        list[int] | None,
        typer.Option(help="batching: max_batch_size; repeatable", show_default="1 8 32"),
    ] = None,
    study_wait_ms: Annotated[
        list[float] | None,
        typer.Option(help="batching: max_wait_ms; repeatable", show_default="0 5 20"),
    ] = None,
    study_images: Annotated[int, typer.Option(help="batching: images per null run")] = 1000,
    model_batch: Annotated[
        list[int] | None,
        typer.Option(help="batching: the model's batch sizes; repeatable", show_default="1 16"),
    ] = None,
    model_wait_ms: Annotated[float, typer.Option(help="batching: the model's max_wait_ms")] = 5.0,
    model_study_images: Annotated[int, typer.Option(help="batching: images per model run")] = 320,
) -> None:
    """End to end through a local stack of its own: load sweep, pipeline overhead (null
    model against the object store alone), efficiency against the bare model, batch-size
    study. Writes bench-e2e.json and PNG plots to --out."""
    import sys

    try:
        import psutil  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the end-to-end bench needs psutil and matplotlib: pip install 'hepato[bench]'"
        ) from None
    from common.bench_e2e import run_bench
    from common.bench_report import print_targets
    from common.bench_setup import BenchOptions, scenario_names
    from common.exceptions import BenchFailed

    if wait not in ("sse", "poll"):
        raise typer.BadParameter("--wait takes sse or poll")
    try:
        chosen = scenario_names(only)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    opts = BenchOptions(
        out=out,
        only=chosen,
        model=model,
        samples=samples,
        wait="sse" if wait == "sse" else "poll",
        timeout_s=timeout_s,
        warmup_images=warmup_images,
        clients=clients,
        chunk=chunk,
        concurrency=tuple(concurrency or (1, 4, 16, 64)),
        sweep_seconds=sweep_seconds,
        load_workers=load_workers,
        batch_images=batch_images,
        batch_clients=tuple(batch_clients or (1, 4)),
        batches_per_client=batches_per_client,
        workers=tuple(workers or (1, 2, 4)),
        overhead_images=overhead_images,
        input_sizes=tuple(input_size or (320, 640)),
        efficiency_images=efficiency_images,
        efficiency_batch=efficiency_batch,
        efficiency_workers=efficiency_workers,
        bare_seconds=bare_seconds,
        study_batches=tuple(study_batch or (1, 8, 32)),
        study_waits_ms=tuple(study_wait_ms or (0.0, 5.0, 20.0)),
        study_images=study_images,
        model_batches=tuple(model_batch or (1, 16)),
        model_wait_ms=model_wait_ms,
        model_study_images=model_study_images,
    )
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_bench(opts, get_settings(), ["hepato", "bench", "e2e", *sys.argv[3:]])
    except BenchFailed as exc:
        typer.echo(f"hepato bench e2e failed: {exc}", err=True)
        typer.echo(f"partial report in {out}", err=True)
        raise typer.Exit(1) from None
    print_targets(result["targets"])
    Console(width=160).print(f"report and plots: {', '.join(result['files'])}")
