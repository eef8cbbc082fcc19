"""YOLOv8 detection through ultralytics on PyTorch."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from hepato.common.manifest import DetectManifest
from hepato.common.results import DetectResult, TaskResult, make_box
from hepato.worker.backends.base import Runtime, require_weights
from hepato.worker.backends.calls import Prediction, predict_by_shape
from hepato.worker.backends.ultralytics_env import configure_ultralytics

log = logging.getLogger(__name__)


class YoloTorch:
    """Loads once per process; a microbatch runs one ultralytics call per image size
    (see worker.backends.calls)."""

    def __init__(self, manifest: DetectManifest, runtime: Runtime) -> None:
        self.manifest = manifest
        # A missing .pt makes ultralytics try a download; refuse first.
        weights = require_weights(manifest)
        configure_ultralytics(runtime.config_dir)
        import torch
        from ultralytics import YOLO

        self.device = runtime.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.half = manifest.fp16 and self.device.startswith("cuda")
        self.model = YOLO(str(weights), task="detect")
        names = list(dict(self.model.names).values())
        if names != manifest.labels:
            log.warning(
                "model %s: manifest labels %s differ from the weights' %s; using the manifest's",
                manifest.name,
                manifest.labels,
                names,
            )
        size = manifest.input_size
        # The first predict builds the predictor, whose device selection resets torch to
        # cpu_count-1 threads; set ours after it.
        self.predict([np.full((size, size, 3), 114, dtype=np.uint8)])
        if self.device == "cpu":
            torch.set_num_threads(runtime.cpu_threads)
        log.info(
            "model %s: ultralytics on %s%s (%s, torch threads: %d)",
            manifest.name,
            self.device,
            ", fp16" if self.half else "",
            weights,
            torch.get_num_threads(),
        )

    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        return predict_by_shape(images, self._predict_group)

    def _predict_group(self, images: list[np.ndarray]) -> list[TaskResult]:
        options = self.manifest.options
        # fp16 only when asked: ultralytics warns on every call that passes `half`.
        extra = {"half": True} if self.half else {}
        # ultralytics takes numpy images as OpenCV gives them: BGR.
        results = self.model.predict(
            [np.ascontiguousarray(image[..., ::-1]) for image in images],
            imgsz=self.manifest.input_size,
            conf=options.score_threshold,
            iou=options.iou,
            max_det=options.max_detections,
            device=self.device,
            verbose=False,
            **extra,
        )
        labels = self.manifest.labels
        out: list[TaskResult] = []
        result: Any
        for result in results:
            boxes = result.boxes
            xyxy = boxes.xyxy.float().cpu().numpy().tolist()
            scores = boxes.conf.float().cpu().numpy().tolist()
            classes = boxes.cls.cpu().numpy().astype(int).tolist()
            out.append(
                DetectResult(
                    boxes=[
                        make_box(labels, c, float(s), b)
                        for b, s, c in zip(xyxy, scores, classes, strict=True)
                    ]
                )
            )
        return out


def export_onnx(manifest: DetectManifest, runtime: Runtime) -> DetectManifest:
    """Export to ONNX with a dynamic batch axis (and dynamic height/width, which the
    letterbox's minimal rectangles need), next to the .pt. Offline: no simplifier, whose
    missing package ultralytics would otherwise try to install."""
    weights = require_weights(manifest)
    configure_ultralytics(runtime.config_dir)
    from ultralytics import YOLO

    exported = YOLO(str(weights), task="detect").export(
        format="onnx", dynamic=True, simplify=False, imgsz=manifest.input_size, opset=17
    )
    return manifest.model_copy(
        update={
            "name": f"{manifest.name}-onnx",
            "backend": "onnx",
            "weights": _relative(exported, manifest),
        }
    )


def _relative(path: str | Path, manifest: DetectManifest) -> Path:
    """The exported file as the new manifest, written beside the old, will name it."""
    target = Path(path).resolve()
    if manifest.source is None:
        return target
    return Path(os.path.relpath(target, manifest.source.parent))
