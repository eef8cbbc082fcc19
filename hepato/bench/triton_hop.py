"""`hepato bench models --triton`: what the hop to Triton costs. Each ONNX detector and
classifier measured in process is exported to a Triton repository, served by a real
Triton (scripts/triton_serve.py in .venv-triton, ONNX Runtime with the same threads) and
measured again through the triton backend at the same microbatch sizes, over gRPC and
HTTP: images/s through Triton / images/s in process."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from rich.table import Table

from hepato.bench.models import Measurement, measure
from hepato.common.manifest import ClassifyManifest, DetectManifest, ModelManifest
from hepato.worker.backends.base import Runtime, load_model

PROTOCOLS: tuple[Literal["grpc", "http"], ...] = ("grpc", "http")


@dataclass(frozen=True)
class Hop:
    protocol: str
    local: Measurement  # the graph on ONNX Runtime in this process
    triton: Measurement  # the same graph, same batch, through Triton

    @property
    def ratio(self) -> float:
        return self.triton.images_per_s / self.local.images_per_s

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.local.model,
            "protocol": self.protocol,
            "batch": self.local.batch,
            "onnx_images_per_s": self.local.images_per_s,
            "triton_images_per_s": self.triton.images_per_s,
            "triton_over_onnx": self.ratio,
        }


def servable(manifests: Sequence[ModelManifest]) -> list[DetectManifest | ClassifyManifest]:
    """The models a Triton repository can take: ONNX detectors and classifiers."""
    return [
        m
        for m in manifests
        if isinstance(m, DetectManifest | ClassifyManifest)
        and m.backend == "onnx"
        and m.weights_present
    ]


def bench_triton(
    manifests: Sequence[ModelManifest],
    local: Sequence[Measurement],
    runtime: Runtime,
    images: Sequence[np.ndarray],
    *,
    min_seconds: float,
    min_calls: int,
) -> list[Hop]:
    """For each servable model among ``manifests`` and each of its ``local``
    measurements, the same measurement through Triton over each protocol."""
    from hepato.devstack.triton import TritonServer
    from hepato.worker.triton_export import export_triton

    chosen = servable(manifests)
    if not chosen:
        return []
    hops: list[Hop] = []
    with tempfile.TemporaryDirectory(prefix="hepato-bench-triton-") as tmp:
        repository = Path(tmp) / "repository"
        exported = {m.name: export_triton(m, repository).manifest for m in chosen}
        log_path = Path(tmp) / "triton.log"
        with TritonServer(repository, threads=runtime.cpu_threads, log_path=log_path) as server:
            for name, manifest in exported.items():
                assert isinstance(manifest, DetectManifest | ClassifyManifest) and manifest.triton
                for protocol in PROTOCOLS:
                    options = manifest.triton.model_copy(
                        update={"url": server.url(protocol), "protocol": protocol}
                    )
                    model = load_model(manifest.model_copy(update={"triton": options}), runtime)
                    for before in (m for m in local if m.model == name):
                        after = measure(model, images, before.batch, min_seconds, min_calls)
                        hops.append(Hop(protocol, before, after))
                    model.graph.close()  # type: ignore[attr-defined]
    return hops


def hop_table(hops: Sequence[Hop], device: str) -> Table:
    table = Table(title=f"the Triton hop on {device}: images/s through Triton / in process")
    for col in ("model", "protocol", "batch", "in process", "through Triton", "ratio"):
        table.add_column(col)
    for h in hops:
        table.add_row(
            h.local.model,
            h.protocol,
            str(h.local.batch),
            f"{h.local.images_per_s:.1f}",
            f"{h.triton.images_per_s:.1f}",
            f"{h.ratio:.2f}x",
        )
    return table
