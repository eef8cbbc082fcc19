"""YOLOv8 detection through ultralytics on PyTorch."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.exceptions import ModelWeightsNotFound
from common.jobs import DetectionRow
from worker.grouping import Prediction, predict_by_shape
from worker.ultralytics_env import configure_ultralytics

log = logging.getLogger(__name__)


class YoloDetector:
    """Loads once per process; ``predict`` runs a whole microbatch, one ultralytics call
    per image size (see worker.grouping)."""

    def __init__(
        self,
        weights: Path,
        *,
        imgsz: int,
        conf: float,
        iou: float,
        device: str,
        threads: int,
        config_dir: Path,
    ) -> None:
        weights = Path(weights)
        # A missing .pt makes ultralytics try a download; refuse first.
        if not weights.is_file():
            raise ModelWeightsNotFound(f"model weights not found: {weights}")
        configure_ultralytics(config_dir)
        import torch
        from ultralytics import YOLO

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.imgsz, self.conf, self.iou = imgsz, conf, iou
        self.model = YOLO(str(weights), task="detect")
        self.labels: dict[int, str] = dict(self.model.names)
        # The first predict builds the predictor, whose device selection resets torch to
        # cpu_count-1 threads; set ours after it.
        self.predict([np.full((imgsz, imgsz, 3), 114, dtype=np.uint8)])
        if self.device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        log.info(
            "loaded %s on %s (classes: %s, torch threads: %d)",
            weights,
            self.device,
            ", ".join(self.labels.values()),
            torch.get_num_threads(),
        )

    def predict(self, images: list[np.ndarray]) -> Prediction:
        return predict_by_shape(images, self._predict_group)

    def _predict_group(self, images: list[np.ndarray]) -> list[list[DetectionRow]]:
        results = self.model.predict(
            images,
            imgsz=self.imgsz,
            conf=self.conf,
            iou=self.iou,
            device=self.device,
            verbose=False,
        )
        out = []
        result: Any
        for result in results:
            boxes = result.boxes
            xyxy = boxes.xyxy.cpu().numpy().tolist()
            scores = boxes.conf.cpu().numpy().tolist()
            classes = boxes.cls.cpu().numpy().astype(int).tolist()
            out.append(
                [
                    DetectionRow(c, self.labels[c], float(s), (b[0], b[1], b[2], b[3]))
                    for b, s, c in zip(xyxy, scores, classes, strict=True)
                ]
            )
        return out
