"""What every model backend is: built from its manifest and the worker's runtime, it turns
a microbatch of RGB images into one typed result per image."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from hepato.common import cpus
from hepato.common.exceptions import BackendError, ModelWeightsNotFound, UnknownModel
from hepato.common.manifest import ModelManifest, load_registry
from hepato.common.results import TaskResult
from hepato.common.settings import Settings
from hepato.worker.backends.calls import Prediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where and how models run in this worker process."""

    device: str = ""  # torch device ('cuda', 'cuda:1', 'cpu'); empty = CUDA when present
    threads: int = 0  # CPU threads per runtime; 0 = one per core the loading thread may use
    config_dir: Path = field(default_factory=lambda: Path(".data") / "ultralytics")

    @property
    def cpu_threads(self) -> int:
        # Read while the model loads: in a container with a cpuset, the machine's count
        # would start a pool many times the cores it runs on; with model_cpus, the
        # loading thread is on the model's cores (worker.inference.load_pinned).
        return self.threads or cpus.usable()


class Model(Protocol):
    manifest: ModelManifest

    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        """``images`` are RGB uint8 arrays (H, W, 3) of any sizes."""
        ...


class AsksQuestions(Protocol):
    """A vqa model: each image may come with its own question (None: the manifest's)."""

    manifest: ModelManifest

    def predict(
        self, images: list[np.ndarray], questions: Sequence[str | None] | None = None
    ) -> Prediction[TaskResult]: ...


# (task, backend) -> "module:Class". Imported only when a worker loads such a model, so
# the gateway and an ONNX-only worker never import torch.
BACKENDS: dict[tuple[str, str], str] = {
    ("detect", "ultralytics"): "hepato.worker.backends.yolo_torch:YoloTorch",
    ("detect", "onnx"): "hepato.worker.backends.yolo_onnx:YoloOnnx",
    ("detect", "transformers"): "hepato.worker.backends.detr:Detr",
    ("detect", "null"): "hepato.worker.backends.null:NullModel",
    ("classify", "torch"): "hepato.worker.backends.classify:ResNetTorch",
    ("classify", "onnx"): "hepato.worker.backends.classify:ResNetOnnx",
    ("detect", "triton"): "hepato.worker.backends.triton:YoloTriton",
    ("classify", "triton"): "hepato.worker.backends.triton:ResNetTriton",
    ("zero-shot", "transformers"): "hepato.worker.backends.zero_shot:ClipZeroShot",
    ("zero-shot", "open_clip"): "hepato.worker.backends.open_clip:OpenClipZeroShot",
    ("vqa", "transformers"): "hepato.worker.backends.vqa:VisionLanguageQa",
}


def require_weights(manifest: ModelManifest) -> Path:
    """Refuse before a library tries to download what is missing. (The null backend has
    no weights and never calls this.)"""
    path = manifest.weights_path
    if not path.exists():
        raise ModelWeightsNotFound(
            f"model {manifest.name!r}: weights not found: {path} (from {manifest.source})"
        )
    return path


def load_model(manifest: ModelManifest, runtime: Runtime) -> Model:
    target = BACKENDS[(manifest.task, manifest.backend)]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(
            f"model {manifest.name!r} needs the {manifest.backend} backend, which is not "
            f"installed ({exc}); install hepato[torch] for PyTorch and transformers models, "
            "hepato[onnx-cpu] or hepato[onnx-gpu] for ONNX Runtime"
        ) from exc
    model: Model = getattr(module, class_name)(manifest, runtime)
    return model


def load_models(settings: Settings, names: Sequence[str] = ()) -> dict[str, Model]:
    """Load the named models (else the settings' worker_models, else the default model)
    from the manifests, each once."""
    registry = load_registry(settings.models_dir)
    names = list(dict.fromkeys(names or settings.worker_models or [settings.default_model]))
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UnknownModel(
            f"no manifest for {', '.join(map(repr, unknown))} in {settings.models_dir}; "
            f"available: {', '.join(sorted(registry)) or 'none'}"
        )
    runtime = Runtime(settings.device, settings.cpu_threads, settings.ultralytics_dir)
    loaded = {}
    for name in names:
        started = time.perf_counter()
        loaded[name] = load_model(registry[name], runtime)
        log.info("model %s ready in %.1fs", name, time.perf_counter() - started)
    return loaded
