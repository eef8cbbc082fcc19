"""DETR detection from a transformers checkpoint directory (``DetrForObjectDetection``
and its image processor, as ``save_pretrained`` writes them).

DETR predicts a fixed set of boxes with no duplicates to suppress, so the manifest's
``options.iou`` does not apply; ``score_threshold`` and ``max_detections`` do."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoImageProcessor, DetrForObjectDetection

from hepato.common.exceptions import BackendError
from hepato.common.manifest import DetectManifest
from hepato.common.results import DetectResult, make_box
from hepato.worker.backends.base import Runtime, require_weights
from hepato.worker.backends.calls import Prediction, predict_by_shape
from hepato.worker.backends.torch_runtime import place, to_device

log = logging.getLogger(__name__)

# DETR's own resize bounds are 800 / 1333: other input sizes keep that bound on the aspect
# ratio, so a long strip is not resized to an enormous input.
LONGEST_EDGE_RATIO = 1333 / 800


def resize_bounds(input_size: int) -> dict[str, int]:
    return {"shortest_edge": input_size, "longest_edge": round(input_size * LONGEST_EDGE_RATIO)}


class Detr:
    def __init__(self, manifest: DetectManifest, runtime: Runtime) -> None:
        self.manifest = manifest
        path = require_weights(manifest)
        self.device, self.dtype = place(manifest, runtime)
        # Explicit: transformers 5 otherwise loads in the checkpoint's own dtype.
        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            # Any: transformers' stubs type .to() and config.id2label too loosely to check.
            self.model: Any = cast(
                Any,
                DetrForObjectDetection.from_pretrained(
                    path, local_files_only=True, dtype=self.dtype
                ),
            )
        except OSError as exc:
            raise BackendError(
                f"model {manifest.name!r}: {path} is not a DETR checkpoint directory: {exc}"
            ) from exc
        self.model.to(self.device).eval()
        self.labels = list(manifest.labels)
        id2label: dict[int, str] = dict(self.model.config.id2label)
        if len(id2label) != len(self.labels):
            raise BackendError(
                f"model {manifest.name!r}: the checkpoint has {len(id2label)} classes "
                f"({', '.join(str(id2label[i]) for i in sorted(id2label))}) but the manifest "
                f"{manifest.source} lists {len(self.labels)} labels ({', '.join(self.labels)})"
            )
        # The manifest, not the checkpoint's preprocessor_config.json, sets the input size.
        self.size = resize_bounds(manifest.input_size)
        log.info(
            "loaded %s (backend %s, %s) on %s, %s, input %s",
            manifest.name,
            manifest.backend,
            type(self.model).__name__,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.size,
        )

    def predict(self, images: list[np.ndarray]) -> Prediction[DetectResult]:
        # One call per image size. Images of different sizes in one call are padded to the
        # largest (bottom and right); the pixel mask hides the padding from attention and
        # position embeddings but not from the ResNet, whose convolutions near the padded
        # border see it, and the mask is downsampled by nearest neighbour, so partly padded
        # feature cells count as image. Measured on the tiny and the ResNet-50 builds: boxes
        # move by 0.02-0.04 of the image side and scores by up to 0.1 against each image
        # alone. Equal sizes resize to equal inputs, need no padding, and agree
        # with each image alone to ~1e-7.
        return predict_by_shape(images, self._run)

    def _run(self, images: list[np.ndarray]) -> list[DetectResult]:
        height, width = images[0].shape[:2]
        inputs = self.processor(
            images=images,
            size=self.size,
            return_tensors="pt",
            input_data_format="channels_last",
            device=str(self.device),
        )
        with torch.inference_mode():
            out = self.model(
                pixel_values=to_device(inputs["pixel_values"], self.device, self.dtype),
                pixel_mask=to_device(inputs["pixel_mask"], self.device),
            )
            # Softmax and box scaling in float32 even when the model ran in half.
            found = self.processor.post_process_object_detection(
                SimpleNamespace(logits=out.logits.float(), pred_boxes=out.pred_boxes.float()),
                threshold=self.manifest.options.score_threshold,
                target_sizes=[(height, width)] * len(images),
            )
        return [self._result(f, width, height) for f in found]

    def _result(self, found: dict[str, torch.Tensor], width: int, height: int) -> DetectResult:
        scores = found["scores"]
        # Stable, so equal scores keep the queries' order and results are deterministic.
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[: self.manifest.options.max_detections]
        # A query's centre and size each lie in 0..1, but its corners may not.
        boxes = found["boxes"][order]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        classes = found["labels"][order].tolist()
        return DetectResult(
            boxes=[
                make_box(self.labels, c, s, b)
                for c, s, b in zip(
                    classes, scores[order].tolist(), boxes.cpu().tolist(), strict=True
                )
            ]
        )
