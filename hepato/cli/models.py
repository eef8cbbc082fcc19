"""``hepato models``: what the registry holds, and making new entries for it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from hepato.common.exceptions import HepatoError
from hepato.common.manifest import ModelManifest, dump_manifest, load_manifest, load_registry
from hepato.common.settings import get_settings

app = typer.Typer(help="The model registry: manifests in HEPATO_MODELS_DIR.", no_args_is_help=True)


def _dir(models_dir: Path | None) -> Path:
    return models_dir or get_settings().models_dir


DirOption = Annotated[
    Path | None, typer.Option("--models-dir", help="Manifest directory [default: settings]")
]


@app.command("list")
def list_models(models_dir: DirOption = None) -> None:
    """Each model with its task, backend and whether its weights are present."""
    directory = _dir(models_dir)
    try:
        registry = load_registry(directory)
    except HepatoError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    default = get_settings().default_model
    table = Table(title=f"models in {directory}")
    for col in ("name", "version", "task", "backend", "input", "batch", "labels", "weights"):
        table.add_column(col)
    for name, m in sorted(registry.items()):
        table.add_row(
            f"{name} (default)" if name == default else name,
            m.version,
            m.task,
            m.backend,
            str(m.input_size),
            str(m.max_batch_size),
            ", ".join(m.labels) or "-",
            _weights(m),
        )
    Console(width=200).print(table)


def _weights(m: ModelManifest) -> str:
    triton = getattr(m, "triton", None)
    if triton is not None:  # weights in Triton's repository
        return f"triton {triton.protocol}://{triton.url}/{triton.model_name}"
    return "[green]present[/]" if m.weights_present else f"[red]missing[/] {m.weights_path}"


@app.command()
def export(
    name: Annotated[
        str,
        typer.Argument(
            help="A detect (ultralytics, or onnx for --to triton) or classify (torch, or "
            "onnx for --to triton) model"
        ),
    ],
    to: Annotated[Literal["onnx", "triton"], typer.Option(help="Target format")] = "onnx",
    repository: Annotated[
        Path | None,
        typer.Option(help="--to triton: the model repository [default: <models dir>/triton]"),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="--to triton: host:port of Triton [default: localhost:8001 / 8000]"),
    ] = None,
    protocol: Annotated[
        Literal["grpc", "http"], typer.Option(help="--to triton: how the worker calls Triton")
    ] = "grpc",
    queue_delay_us: Annotated[
        int,
        typer.Option(
            min=0,
            help="--to triton: Triton's wait for more calls to batch, µs (0: the worker's "
            "microbatches are sent as they are)",
        ),
    ] = 0,
    models_dir: DirOption = None,
) -> None:
    """Export a PyTorch detector or classifier to ONNX with a dynamic batch axis, and write
    the manifest of the exported model (NAME-onnx) beside the original's. With --to
    triton, write a Triton model repository entry for the ONNX graph (exporting a PyTorch
    model to ONNX first) and the manifest NAME-triton of the model served from it."""
    directory = _dir(models_dir)
    try:
        registry = load_registry(directory)
        if name not in registry:
            raise typer.BadParameter(f"no model {name!r}; available: {', '.join(sorted(registry))}")
        manifest = registry[name]
        if to == "onnx" or manifest.backend != "onnx":
            manifest = _to_onnx(manifest, directory)
        if to == "triton":
            from hepato.worker.triton_export import export_triton

            try:
                served = export_triton(
                    manifest,
                    repository or directory / "triton",
                    triton_name=name,
                    url=url,
                    protocol=protocol,
                    queue_delay_us=queue_delay_us,
                )
            except (ValueError, FileNotFoundError) as exc:
                raise typer.BadParameter(str(exc)) from None
            target = directory / f"{served.manifest.name}.yaml"
            dump_manifest(served.manifest, target)
            typer.echo(f"wrote {served.model_dir} and its manifest {target}")
    except HepatoError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _to_onnx(manifest: ModelManifest, directory: Path) -> ModelManifest:
    """The ONNX export of a PyTorch detector or classifier, its manifest written beside."""
    from hepato.worker.backends.base import Runtime

    exported: ModelManifest
    if manifest.task == "detect" and manifest.backend == "ultralytics":
        from hepato.worker.backends.yolo_torch import export_onnx as export_yolo

        config_dir = get_settings().ultralytics_dir
        exported = export_yolo(manifest, Runtime(config_dir=config_dir))
    elif manifest.task == "classify" and manifest.backend == "torch":
        from hepato.worker.backends.classify import export_onnx as export_classifier

        out = manifest.weights_path.with_suffix(".onnx")
        exported = export_classifier(manifest, out)
    else:
        raise typer.BadParameter(
            f"{manifest.name} is a {manifest.task} model on {manifest.backend}; export takes "
            "detect models on ultralytics and classify models on torch (and, --to triton, "
            "either on onnx)"
        )
    target = directory / f"{exported.name}.yaml"
    dump_manifest(exported, target)
    typer.echo(f"wrote {exported.weights_path} and its manifest {target}")
    return load_manifest(target)


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write weights and manifests")],
    size: Annotated[
        Literal["tiny", "base"], typer.Option(help="tiny: for tests; base: real model sizes")
    ] = "base",
) -> None:
    """Build one model per task and backend from configuration, with random weights (no
    download): for trying the service and for benchmarks, not for diagnosis."""
    from hepato.worker.builders.all import build_all

    directory.mkdir(parents=True, exist_ok=True)
    for path in build_all(directory, size=size):
        typer.echo(f"wrote {path}")


@app.command()
def quantize(
    name: Annotated[str, typer.Argument(help="A detect or classify model on onnx")],
    int8: Annotated[
        bool, typer.Option("--int8", help="INT8 weights and activations (required: the one kind)")
    ] = False,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            help="Folder of PNG/JPEG/TIFF images like those the model serves "
            "(default: the repository's samples/)"
        ),
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Least agreement with the float model, a fraction: detect box recall and "
            "precision, classify top-1 (default: 0.9 for both)",
        ),
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(min=1, help="Calibration images at most (default: 100)")
    ] = None,
    speed_batch: Annotated[int, typer.Option(min=1, help="Batch of the speed check")] = 8,
    speed_seconds: Annotated[
        float, typer.Option(min=0.0, help="Seconds per model of the speed check; 0 skips it")
    ] = 2.0,
    models_dir: DirOption = None,
) -> None:
    """Quantize an ONNX detector or classifier to INT8 (ONNX Runtime static quantization,
    calibrated on images), check it agrees with the float model on those images, and only
    then write NAME-int8.onnx beside its weights and the manifest NAME-int8. Exit 1 when
    the agreement is below the minimum (nothing written), 2 for unusable input."""
    from hepato.common.settings import REPO_ROOT
    from hepato.worker.backends.base import Runtime
    from hepato.worker.quantize import (
        MAX_CALIBRATION_IMAGES,
        AgreementTooLow,
        calibration_images,
        check_quantizable,
        quantize_model,
    )

    if not int8:
        raise typer.BadParameter("give --int8 (the only quantization there is)")
    settings = get_settings()
    directory = _dir(models_dir)
    folder = calibrate or REPO_ROOT / "samples"
    runtime = Runtime("cpu", settings.cpu_threads, settings.ultralytics_dir)
    console = Console(width=200)
    try:
        registry = load_registry(directory)
        if name not in registry:
            raise typer.BadParameter(f"no model {name!r}; available: {', '.join(sorted(registry))}")
        check_quantizable(registry[name])
        images = calibration_images(folder, max_images or MAX_CALIBRATION_IMAGES)
        console.print(f"calibrating {name} on {len(images)} images from {folder}")
        done = quantize_model(registry[name], directory, images, runtime, min_agreement)
    except AgreementTooLow as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except HepatoError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    console.print(
        f"agreement with float: {done.agreement.summary} "
        f"[green](minimum {done.threshold:.1%}: passed)[/]"
    )
    console.print(f"wrote {done.manifest.weights_path} and its manifest {done.path}")
    if speed_seconds <= 0:
        return
    # Bare-model images/s, one model after the other: a short run, to compare the two. On
    # images of one size (the most common), so a batch is one model call, as tiles are.
    from collections import Counter

    from hepato.bench.models import bench_models

    shape = Counter(image.shape for image in images).most_common(1)[0][0]
    same = [image for image in images if image.shape == shape]
    table = Table(
        title=f"CPU speed, batch {speed_batch} of {shape[1]}x{shape[0]} images, "
        f"{runtime.cpu_threads} threads"
    )
    for col in ("model", "weights", "MB", "images/s"):
        table.add_column(col)
    pair = [registry[name], done.manifest]
    measured = bench_models(
        pair, runtime, same, [speed_batch], min_seconds=speed_seconds, min_calls=3
    )
    for manifest, m in zip(pair, measured, strict=True):
        size = manifest.weights_path.stat().st_size / 1e6
        table.add_row(m.model, manifest.weights_path.name, f"{size:.1f}", f"{m.images_per_s:.1f}")
    console.print(table)
