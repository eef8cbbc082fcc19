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

from hepato.bench.options import BenchOptions, scenario_names
from hepato.bench.scale_cli import scale as scale_command
from hepato.common.manifest import ModelManifest, load_registry
from hepato.common.settings import REPO_ROOT, get_settings

# The defaults of `hepato bench e2e`'s flags.
_D = BenchOptions()


def _shown(values: tuple[float, ...]) -> str:
    return " ".join(f"{v:g}" for v in values)


app = typer.Typer(help="Benchmarks; figures come as ratios from one run.", no_args_is_help=True)
app.command("scale")(scale_command)  # hepato bench scale (issue 18)


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
    triton: Annotated[
        bool,
        typer.Option(
            help="Also through a real Triton (started from .venv-triton): images/s over gRPC "
            "and HTTP / in process, for each ONNX detector and classifier"
        ),
    ] = False,
) -> None:
    """Bare-model images/s at each microbatch size, for every model with weights present."""
    from hepato.bench.models import bench_models, sample_images
    from hepato.worker.backends.base import Runtime

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
    images = sample_images(samples)
    results = bench_models(
        present,
        runtime,
        images,
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
    hops = []
    if triton:
        from hepato.bench.triton_hop import bench_triton, hop_table

        hops = bench_triton(present, results, runtime, images, min_seconds=seconds, min_calls=calls)
        Console(width=160).print(hop_table(hops, device))
    if json_out:
        json_out.write_text(
            json.dumps(
                {
                    "device": device,
                    "results": [{**r.__dict__, "images_per_s": r.images_per_s} for r in results],
                    **({"triton": [h.as_dict() for h in hops]} if triton else {}),
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
    out: Annotated[Path, typer.Option(help="Where the JSON report and the plots go")] = _D.out,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Scenarios to run, repeatable or comma-separated: load, overhead, efficiency, "
            "batching, realtime (or a, b, c, d, e)",
            show_default="all",
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Detector of the load, efficiency, study, realtime runs")
    ] = _D.model,
    samples: Annotated[Path, typer.Option(help="Folder of synthetic_*.png")] = _D.samples,
    wait: Annotated[
        str, typer.Option(help="How single-image clients see a job finish: sse or poll")
    ] = _D.wait,
    upload: Annotated[
        str,
        typer.Option(
            help="How clients send images: multipart (through the gateway) or direct "
            "(presigned PUTs to the object store, then a commit; /v1/detect stays multipart)"
        ),
    ] = _D.upload,
    timeout_s: Annotated[
        float, typer.Option(help="Longest one measurement may take, s")
    ] = _D.timeout_s,
    warmup_images: Annotated[
        int, typer.Option(help="Unmeasured images per new workers")
    ] = _D.warmup_images,
    clients: Annotated[
        int, typer.Option(help="Concurrent submitters of the throughput runs and store-alone")
    ] = _D.clients,
    chunk: Annotated[
        int, typer.Option(help="Images per batch request in throughput runs")
    ] = _D.chunk,
    concurrency: Annotated[
        list[int] | None,
        typer.Option(
            help="load: single-image clients; repeatable", show_default=_shown(_D.concurrency)
        ),
    ] = None,
    sweep_seconds: Annotated[
        float, typer.Option(help="load: seconds per concurrency")
    ] = _D.sweep_seconds,
    load_workers: Annotated[int, typer.Option(help="load: workers")] = _D.load_workers,
    batch_images: Annotated[int, typer.Option(help="load: images per batch")] = _D.batch_images,
    batch_clients: Annotated[
        list[int] | None,
        typer.Option(
            help="load: concurrent batch clients; repeatable", show_default=_shown(_D.batch_clients)
        ),
    ] = None,
    batches_per_client: Annotated[
        int, typer.Option(help="load: batches per client")
    ] = _D.batches_per_client,
    workers: Annotated[
        list[int] | None,
        typer.Option(help="overhead: worker counts; repeatable", show_default=_shown(_D.workers)),
    ] = None,
    overhead_images: Annotated[
        int, typer.Option(help="overhead: images per run")
    ] = _D.overhead_images,
    input_size: Annotated[
        list[int] | None,
        typer.Option(
            help="efficiency: input sizes, px; repeatable", show_default=_shown(_D.input_sizes)
        ),
    ] = None,
    efficiency_images: Annotated[
        int, typer.Option(help="efficiency: images per run")
    ] = _D.efficiency_images,
    efficiency_batch: Annotated[
        int, typer.Option(help="efficiency: max_batch_size")
    ] = _D.efficiency_batch,
    efficiency_workers: Annotated[
        int, typer.Option(help="efficiency: workers")
    ] = _D.efficiency_workers,
    bare_seconds: Annotated[
        float, typer.Option(help="Least time per bare measurement, s")
    ] = _D.bare_seconds,
    study_batch: Annotated[
        list[int] | None,
        typer.Option(
            help="batching: max_batch_size; repeatable", show_default=_shown(_D.study_batches)
        ),
    ] = None,
    study_wait_ms: Annotated[
        list[float] | None,
        typer.Option(
            help="batching: max_wait_ms; repeatable", show_default=_shown(_D.study_waits_ms)
        ),
    ] = None,
    study_images: Annotated[
        int, typer.Option(help="batching: images per null run")
    ] = _D.study_images,
    model_batch: Annotated[
        list[int] | None,
        typer.Option(
            help="batching: the model's batch sizes; repeatable",
            show_default=_shown(_D.model_batches),
        ),
    ] = None,
    model_wait_ms: Annotated[
        float, typer.Option(help="batching: the model's max_wait_ms")
    ] = _D.model_wait_ms,
    model_study_images: Annotated[
        int, typer.Option(help="batching: images per model run")
    ] = _D.model_study_images,
    realtime_size: Annotated[
        int, typer.Option(help="realtime: the model's input size, px")
    ] = _D.realtime_size,
    realtime_requests: Annotated[
        int, typer.Option(help="realtime: sequential requests at 1 client")
    ] = _D.realtime_requests,
    realtime_concurrency: Annotated[
        list[int] | None,
        typer.Option(
            help="realtime: clients, each against the bare model at that batch; repeatable",
            show_default=_shown(_D.realtime_concurrency),
        ),
    ] = None,
    realtime_workers: Annotated[
        int, typer.Option(min=1, help="realtime: workers serving the detects")
    ] = _D.realtime_workers,
    model_cpus: Annotated[
        str,
        typer.Option(
            help="realtime: cores of the model's own (e.g. 1): the workers' model threads "
            "and the bare model there, the rest of the stack on the other cores"
        ),
    ] = _D.model_cpus,
) -> None:
    """End to end through a local stack of its own: load sweep, pipeline overhead (null
    model against the object store alone), efficiency against the bare model, batch-size
    study, real-time latency of /v1/detect against the bare model. Writes bench-e2e.json
    and PNG plots to --out."""
    import sys

    try:
        import psutil  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the end-to-end bench needs psutil and matplotlib: pip install 'hepato[bench]'"
        ) from None
    from hepato.bench.e2e import run_bench
    from hepato.bench.report import print_targets
    from hepato.common import cpus
    from hepato.common.exceptions import BenchFailed

    try:  # before the stack starts, not at the realtime scenario
        cpus.split(model_cpus)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model-cpus") from None

    if wait not in ("sse", "poll"):
        raise typer.BadParameter("--wait takes sse or poll")
    if upload not in ("multipart", "direct"):
        raise typer.BadParameter("--upload takes multipart or direct")
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
        upload="direct" if upload == "direct" else "multipart",
        timeout_s=timeout_s,
        warmup_images=warmup_images,
        clients=clients,
        chunk=chunk,
        concurrency=tuple(concurrency or _D.concurrency),
        sweep_seconds=sweep_seconds,
        load_workers=load_workers,
        batch_images=batch_images,
        batch_clients=tuple(batch_clients or _D.batch_clients),
        batches_per_client=batches_per_client,
        workers=tuple(workers or _D.workers),
        overhead_images=overhead_images,
        input_sizes=tuple(input_size or _D.input_sizes),
        efficiency_images=efficiency_images,
        efficiency_batch=efficiency_batch,
        efficiency_workers=efficiency_workers,
        bare_seconds=bare_seconds,
        study_batches=tuple(study_batch or _D.study_batches),
        study_waits_ms=tuple(study_wait_ms or _D.study_waits_ms),
        study_images=study_images,
        model_batches=tuple(model_batch or _D.model_batches),
        model_wait_ms=model_wait_ms,
        model_study_images=model_study_images,
        realtime_size=realtime_size,
        realtime_requests=realtime_requests,
        realtime_concurrency=tuple(realtime_concurrency or _D.realtime_concurrency),
        realtime_workers=realtime_workers,
        model_cpus=model_cpus,
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


@app.command()
def slides(
    out: Annotated[Path, typer.Option(help="Where bench-slides.json goes")] = _D.out,
    size: Annotated[
        int | None,
        typer.Option(
            min=512,
            help="Level-0 side of the synthetic slide, px (the memory run adds one of twice "
            "the area)",
            show_default="20000; 4000 with --quick",
        ),
    ] = None,
    quick: Annotated[bool, typer.Option(help="A small slide, for the test suite")] = False,
    model: Annotated[str, typer.Option(help="Detector the slide goes to (null: none)")] = (
        _D.model
    ),
    batch: Annotated[
        int, typer.Option(min=1, help="Worker microbatch cap and the bare model's batch")
    ] = 16,
    fmt: Annotated[str, typer.Option(help="Slide format: svs or tiff")] = "svs",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic slide")] = 0,
    timeout_s: Annotated[float, typer.Option(help="Longest one measurement may take, s")] = 1800.0,
    samples: Annotated[Path, typer.Option(help="Folder of synthetic_*.png")] = _D.samples,
) -> None:
    """A synthetic whole slide through a local stack of its own: tiles/s end to end (1
    worker) against the bare model on the same tiles and against the same tiles sent as
    images, CPU ms per tile by part of the stack, and the worker's peak memory on the
    slide and on one of twice the area. Writes bench-slides.json to --out."""
    import sys

    try:
        import psutil  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the slide bench needs psutil: pip install 'hepato[bench]'"
        ) from None
    from hepato.bench.slides import QUICK_SIZE, SlideBenchOptions, run_slide_bench
    from hepato.common.exceptions import BenchFailed

    if fmt not in ("svs", "tiff"):
        raise typer.BadParameter("--fmt takes svs or tiff")
    opts = SlideBenchOptions(
        out=out,
        size=size or (QUICK_SIZE if quick else SlideBenchOptions.size),
        model=model,
        batch=batch,
        fmt="svs" if fmt == "svs" else "tiff",
        seed=seed,
        timeout_s=timeout_s,
        samples=samples,
    )
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_slide_bench(opts, get_settings(), ["hepato", "bench", "slides", *sys.argv[3:]])
    except BenchFailed as exc:
        typer.echo(f"hepato bench slides failed: {exc}", err=True)
        typer.echo(f"partial report in {out}", err=True)
        raise typer.Exit(1) from None
