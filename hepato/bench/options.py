"""The options of ``hepato bench e2e`` and their defaults, in one place: the command's
flags take their defaults from here. Imports nothing heavy (every ``hepato`` command
loads it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hepato.common.settings import REPO_ROOT

# How single-image clients see a job finish: its event stream, or polling.
Wait = Literal["sse", "poll"]
# How the clients send images: multipart through the gateway, or direct (presigned PUTs
# to the object store, then a commit: hepato.bench.uploads).
Upload = Literal["multipart", "direct"]

SCENARIOS = ("load", "overhead", "efficiency", "batching", "realtime")
ALIASES = {"a": "load", "b": "overhead", "c": "efficiency", "d": "batching", "e": "realtime"}
NULL_MODEL = "null"


@dataclass
class BenchOptions:
    out: Path = REPO_ROOT / ".data" / "bench"
    only: tuple[str, ...] = SCENARIOS
    model: str = "hepato-yolov8n"
    samples: Path = REPO_ROOT / "samples"
    wait: Wait = "sse"
    upload: Upload = "multipart"
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
    # realtime: POST /v1/detect against the bare model
    realtime_size: int = 320
    realtime_requests: int = 100  # sequential, at concurrency 1
    realtime_concurrency: tuple[int, ...] = (4, 16)  # each against the bare model's batch
    # Workers serving the detects, each on cores // workers threads; the bare model has
    # the machine's cores (what one process gets from it).
    realtime_workers: int = 1
    # Cores of the model's own (a Linux CPU list): the workers' model threads and the bare
    # model there, every other part of the stack on the rest; empty: all share every core.
    model_cpus: str = ""


def scenario_names(only: list[str] | None) -> tuple[str, ...]:
    if not only:
        return SCENARIOS
    names = [ALIASES.get(n, n) for part in only for n in part.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)}; use {', '.join(SCENARIOS)}")
    return tuple(n for n in SCENARIOS if n in names)
