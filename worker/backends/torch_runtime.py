"""Placement shared by the PyTorch backends: which device, how many CPU threads, which
dtype. Importing this module imports torch."""

from __future__ import annotations

import torch

from hepato.common.manifest import ModelManifest
from hepato.worker.backends.base import Runtime


def place(manifest: ModelManifest, runtime: Runtime) -> tuple[torch.device, torch.dtype]:
    """The runtime's device (CUDA when present and none is named), its CPU thread count,
    and float16 when the manifest asks for it on a GPU, float32 otherwise."""
    device = torch.device(runtime.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(runtime.cpu_threads)
    half = manifest.fp16 and device.type == "cuda"
    return device, torch.float16 if half else torch.float32


def to_device(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A host batch onto the model's device. To a GPU it goes from pinned memory without
    blocking, so the copy overlaps the host work queued before the model call."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)
