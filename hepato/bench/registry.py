"""The model registry the stack of ``hepato bench e2e`` serves (every shipped manifest,
plus the detector at each input size the scenarios need)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hepato.bench.options import NULL_MODEL, BenchOptions
from hepato.common.exceptions import BenchFailed
from hepato.common.manifest import dump_manifest, load_registry
from hepato.common.settings import Settings


def variant_name(model: str, input_size: int) -> str:
    return f"{model}-bench-{input_size}"


def write_models_dir(settings: Settings, opts: BenchOptions, folder: Path) -> None:
    """Every registry manifest (weights made absolute), the null model able to take the
    study's largest batch, and the model at each input size the runs need."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.yaml"):  # a previous run's variants
        stale.unlink()
    registry = load_registry(settings.models_dir)
    for needed in (opts.model, NULL_MODEL):
        if needed not in registry:
            raise BenchFailed("start-up", f"no model {needed!r} in {settings.models_dir}")
    for name, m in registry.items():
        update: dict[str, Any] = {}
        if m.weights is not None:
            update["weights"] = m.weights_path
        if name == NULL_MODEL:
            update["max_batch_size"] = max(m.max_batch_size, *opts.study_batches)
        dump_manifest(m.model_copy(update=update), folder / f"{name}.yaml")
    base = registry[opts.model]
    # The realtime scenario serves a variant with its own batching: as large a batch as
    # its most concurrent clients can fill.
    largest = max(opts.efficiency_batch, *opts.model_batches, *opts.realtime_concurrency)
    for size in {*opts.input_sizes, opts.model_input_size, opts.realtime_size}:
        variant = base.model_copy(
            update={
                "name": variant_name(opts.model, size),
                # The null model has no weights to point at.
                "weights": base.weights_path if base.weights is not None else None,
                "input_size": size,
                "max_batch_size": largest,
                "description": f"{base.name} at {size} px for hepato bench",
            }
        )
        dump_manifest(variant, folder / f"{variant.name}.yaml")
