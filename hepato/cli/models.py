"""``hepato models``: what the registry holds, and making new entries for it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from hepato.common.exceptions import HepatoError
from hepato.common.manifest import ModelManifest, dump_manifest, load_registry
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
            "[green]present[/]" if m.weights_present else f"[red]missing[/] {m.weights_path}",
        )
    Console(width=200).print(table)


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="A detect (ultralytics) or classify (torch) model")],
    to: Annotated[Literal["onnx"], typer.Option(help="Target format")] = "onnx",
    models_dir: DirOption = None,
) -> None:
    """Export a PyTorch detector or classifier to ONNX with a dynamic batch axis, and write
    the manifest of the exported model (NAME-onnx) beside the original's."""
    from hepato.worker.backends.base import Runtime

    settings = get_settings()
    directory = _dir(models_dir)
    try:
        registry = load_registry(directory)
        if name not in registry:
            raise typer.BadParameter(f"no model {name!r}; available: {', '.join(sorted(registry))}")
        manifest = registry[name]
        exported: ModelManifest
        if manifest.task == "detect" and manifest.backend == "ultralytics":
            from hepato.worker.backends.yolo_torch import export_onnx as export_yolo

            exported = export_yolo(manifest, Runtime(config_dir=settings.ultralytics_dir))
        elif manifest.task == "classify" and manifest.backend == "torch":
            from hepato.worker.backends.classify import export_onnx as export_classifier

            out = manifest.weights_path.with_suffix(".onnx")
            exported = export_classifier(manifest, out)
        else:
            raise typer.BadParameter(
                f"{name} is a {manifest.task} model on {manifest.backend}; export takes "
                "detect models on ultralytics and classify models on torch"
            )
    except HepatoError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    target = directory / f"{exported.name}.yaml"
    dump_manifest(exported, target)
    typer.echo(f"wrote {exported.weights_path} and its manifest {target}")


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
