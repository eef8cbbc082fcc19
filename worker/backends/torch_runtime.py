"""Placement shared by the PyTorch backends: which device, how many CPU threads, which
dtype. Importing this module imports torch."""

from __future__ import annotations

import torch

from common.manifest import ModelManifest
from worker.backends.base import Runtime


def place(manifest: ModelManifest, runtime: Runtime) -> tuple[torch.device, torch.dtype]:
    """The runtime's device (CUDA when present and none is named), its CPU thread count,
    and float16 when the manifest asks for it on a GPU, float32 otherwise."""
    device = torch.device(runtime.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(runtime.cpu_threads)
    half = manifest.fp16 and device.type == "cuda"
    return device, torch.float16 if half else torch.float32
