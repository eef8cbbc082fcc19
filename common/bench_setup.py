"""The settings of ``hepato bench e2e`` and the model registry its stack serves: every
shipped manifest, plus the detector at each input size the scenarios need."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.bench_load import Wait
from common.exceptions import BenchFailed
from common.manifest import dump_manifest, load_registry
from common.settings import REPO_ROOT, Settings

SCENARIOS = ("load", "overhead", "efficiency", "batching")
ALIASES = {"a": "load", "b": "overhead", "c": "efficiency", "d": "batching"}
NULL_MODEL = "null"


@dataclass
class BenchOptions:
    out: Path
    only: tuple[str, ...] = SCENARIOS
    model: str = "hepato-yolov8n"
    samples: Path = REPO_ROOT / "samples"
    wait: Wait = "sse"
    timeout_s: float = 300.0  # per measurement
    warmup_images: int = 16  # through each new set of workers, not measured
    clients: int = 8  # concurrent submitters in the throughput runs (and store-alone)
    chunk: int = 25  # images per POST /v1/batches in the throughput runs
    # load
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    sweep_seconds: float = 15.0
    load_workers: int = 1
    batch_images: int = 100
    batch_clients: tuple[int, ...] = (1, 4)
    batches_per_client: int = 2
    # overhead
    workers: tuple[int, ...] = (1, 2, 4)
    overhead_images: int = 1500
    # efficiency
    input_sizes: tuple[int, ...] = (320, 640)
    efficiency_images: int = 400
    efficiency_batch: int = 16
    efficiency_workers: int = 1
    bare_seconds: float = 5.0
    # batching
    study_batches: tuple[int, ...] = (1, 8, 32)
    study_waits_ms: tuple[float, ...] = (0.0, 5.0, 20.0)
    study_images: int = 1000
    model_batches: tuple[int, ...] = (1, 16)
    model_wait_ms: float = 5.0
    model_input_size: int = 320
    model_study_images: int = 320


def scenario_names(only: list[str] | None) -> tuple[str, ...]:
    if not only:
        return SCENARIOS
    names = [ALIASES.get(n, n) for part in only for n in part.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)}; use {', '.join(SCENARIOS)}")
    return tuple(n for n in SCENARIOS if n in names)


def threads_for(workers: int) -> int:
    """Workers on one CPU share its cores rather than each taking all of them."""
    return max(1, (os.cpu_count() or 1) // workers)


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
    largest = max(opts.efficiency_batch, *opts.model_batches)
    for size in {*opts.input_sizes, opts.model_input_size}:
        variant = base.model_copy(
            update={
                "name": variant_name(opts.model, size),
                "weights": base.weights_path,
                "input_size": size,
                "max_batch_size": largest,
                "description": f"{base.name} at {size} px for hepato bench",
            }
        )
        dump_manifest(variant, folder / f"{variant.name}.yaml")
