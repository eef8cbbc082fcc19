"""Whole-image classification with a torchvision ResNet, on PyTorch or on ONNX Runtime.

Both backends share the same numpy pre- and post-processing, so for the same weights they
differ only by the runtime's arithmetic. Every image is resized to one fixed square input,
so a microbatch of mixed sizes runs as one model call and gives, image for image, what each
image gives alone. torch is imported only inside the PyTorch backend and the exporter: an
ONNX-only worker has neither torch nor torchvision."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hepato.common.manifest import ClassifyManifest
from hepato.common.results import ClassifyResult, LabelProbability, TaskResult
from hepato.worker.backends.base import Runtime, require_weights
from hepato.worker.backends.calls import Prediction, predict_whole
from hepato.worker.backends.onnx_runtime import CPU, session

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ONNX_OPSET = 17
SAFETENSORS_SUFFIX = ".safetensors"


def preprocess(
    images: Sequence[np.ndarray],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """RGB uint8 (H, W, 3) images of any sizes to one normalised NCHW float32 batch."""
    batch = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        if image.shape[:2] != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        batch[i] = image
    batch /= 255.0
    batch -= np.asarray(mean, dtype=np.float32)
    batch /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def softmax(logits: np.ndarray) -> np.ndarray:
    # float64 so that probabilities of far-apart logits still sum to 1 within rounding.
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def to_results(logits: np.ndarray, labels: Sequence[str]) -> list[TaskResult]:
    """Logits (N, classes) to one result per image, every class, most probable first (ties
    in class order)."""
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ValueError(f"expected logits of shape (N, {len(labels)}), got {logits.shape}")
    out: list[TaskResult] = []
    for row in softmax(logits):
        order = np.argsort(-row, kind="stable")
        out.append(
            ClassifyResult(
                labels=[
                    LabelProbability(label=labels[c], class_id=int(c), probability=float(row[c]))
                    for c in order
                ]
            )
        )
    return out


def build_resnet(manifest: ClassifyManifest) -> Any:
    """The manifest's torchvision ResNet with its weights loaded, on the CPU, in eval mode."""
    import torch
    import torchvision

    path = require_weights(manifest)
    factory = getattr(torchvision.models, manifest.options.architecture)
    model = factory(weights=None, num_classes=len(manifest.labels))
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


class ResNetTorch:
    """A torchvision ResNet state dict on PyTorch."""

    def __init__(self, manifest: ClassifyManifest, runtime: Runtime) -> None:
        import torch

        self.manifest = manifest
        require_weights(manifest)
        self._torch = torch
        from hepato.worker.backends.torch_runtime import place, to_device

        self._to_device = to_device

        self.device, self.dtype = place(manifest, runtime)
        self.model = build_resnet(manifest).to(self.device, self.dtype)
        log.info(
            "model %s: classify torch %s on %s, %s",
            manifest.name,
            manifest.options.architecture,
            self.device,
            str(self.dtype).removeprefix("torch."),
        )

    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        return predict_whole(images, self._run)

    def _run(self, images: list[np.ndarray]) -> list[TaskResult]:
        m = self.manifest
        batch = preprocess(images, m.input_size, m.options.mean, m.options.std)
        torch = self._torch
        with torch.inference_mode():
            tensor = self._to_device(torch.from_numpy(batch), self.device, self.dtype)
            logits = self.model(tensor).float().cpu().numpy()
        return to_results(logits, m.labels)


class ResNetGraph:
    """The numpy pre- and post-processing around one model call on the whole microbatch,
    ``logits``, which each runtime of an exported graph gives (ONNX Runtime here, Triton
    in triton.py)."""

    manifest: ClassifyManifest

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """A normalised NCHW float32 batch to its (N, classes) logits."""
        raise NotImplementedError

    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        return predict_whole(images, self._run)

    def _run(self, images: list[np.ndarray]) -> list[TaskResult]:
        m = self.manifest
        batch = preprocess(images, m.input_size, m.options.mean, m.options.std)
        return to_results(np.asarray(self.logits(batch)), m.labels)


class ResNetOnnx(ResNetGraph):
    """An exported ResNet on ONNX Runtime (see ``export_onnx``); no torch needed."""

    def __init__(self, manifest: ClassifyManifest, runtime: Runtime) -> None:
        self.manifest = manifest
        require_weights(manifest)
        self.session = session(manifest, runtime)
        self.input_name = self.session.get_inputs()[0].name
        provider = self.session.get_providers()[0]
        # session() converts to fp16 on a GPU only, keeping float32 inputs and outputs.
        half = manifest.fp16 and provider != CPU
        log.info(
            "model %s: classify onnx on %s, %s",
            manifest.name,
            provider,
            "float16" if half else "float32",
        )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(None, {self.input_name: batch})
        return np.asarray(logits)


def export_onnx(manifest: ClassifyManifest, out: Path) -> ClassifyManifest:
    """Export a torch-backend classifier to an ONNX graph at ``out`` with a dynamic batch
    axis, and return its manifest (the caller writes it). ``weights`` is ``out`` as given:
    pass it absolute, or relative to the directory the new manifest will be written in."""
    import onnx
    import torch

    if manifest.backend != "torch":
        raise ValueError(f"model {manifest.name!r}: can only export a torch model")
    model = build_resnet(manifest)
    example = torch.zeros(1, 3, manifest.input_size, manifest.input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The dynamo exporter needs onnxscript, which this project does not install; the
    # TorchScript exporter handles a ResNet fully, and its deprecation notice is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(out),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise RuntimeError(f"exported {out} has a fixed batch size ({batch_dim.dim_value})")
    # Validated anew: the longer name must still be a valid model name.
    fields = manifest.model_dump()
    fields.update(name=f"{manifest.name}-onnx", backend="onnx", weights=out)
    return ClassifyManifest.model_validate(fields)
