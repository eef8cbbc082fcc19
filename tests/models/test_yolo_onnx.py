"""The ONNX Runtime YOLOv8 backend gives what ultralytics on PyTorch gives for the same
weights, with its own letterbox and NMS."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import DEMO_WEIGHTS, REPO, SAMPLES
from worker.yolo_onnx import YoloOnnxDetector, letterbox, nms, postprocess

LABELS = ["fibrosis", "inflammation", "steatosis", "ballooning"]
IMGSZ, CONF, IOU = 320, 0.25, 0.5


@pytest.fixture(scope="module")
def onnx_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.ultralytics_env import configure_ultralytics

    configure_ultralytics(REPO / ".data" / "ultralytics")
    from ultralytics import YOLO

    folder = tmp_path_factory.mktemp("onnx")
    weights = folder / DEMO_WEIGHTS.name
    weights.write_bytes(DEMO_WEIGHTS.read_bytes())
    exported = YOLO(str(weights)).export(
        format="onnx", dynamic=True, simplify=False, imgsz=IMGSZ, opset=17
    )
    return Path(exported)


def test_onnx_equals_pytorch_on_every_sample(onnx_weights: Path) -> None:
    from ultralytics import YOLO

    detector = YoloOnnxDetector(onnx_weights, labels=LABELS, imgsz=IMGSZ, conf=CONF, iou=IOU)
    reference = YOLO(str(DEMO_WEIGHTS), task="detect")
    paths = sorted(SAMPLES.glob("*.png")) + sorted(SAMPLES.glob("*.jpg"))
    got, sizes, _ = detector.predict([cv2.imread(str(p)) for p in paths])
    assert max(sizes) > 1, "equal-size images ran as one batch"
    compared = 0
    for path, dets in zip(paths, got, strict=True):
        want = reference.predict(
            str(path), imgsz=IMGSZ, conf=CONF, iou=IOU, device="cpu", verbose=False
        )[0].boxes
        assert [d.class_id for d in dets] == [int(c) for c in want.cls], path.name
        for d, box, score in zip(dets, want.xyxy.tolist(), want.conf.tolist(), strict=True):
            assert d.box == pytest.approx(box, abs=1e-2), path.name
            assert d.score == pytest.approx(score, abs=1e-4), path.name
            compared += 1
    assert compared > 20


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (300, 300), (100, 1000)])
def test_boxes_map_back_through_the_letterbox(shape: tuple[int, int]) -> None:
    image = np.zeros((*shape, 3), dtype=np.uint8)
    boxed, scale, (left, top) = letterbox(image, IMGSZ, auto=True)
    assert boxed.shape[0] % 32 == 0 and boxed.shape[1] % 32 == 0
    assert max(boxed.shape[:2]) == IMGSZ
    # A box known in original pixels, as the model would see it after letterboxing.
    x1, y1, x2, y2 = 0.1 * shape[1], 0.2 * shape[0], 0.6 * shape[1], 0.9 * shape[0]
    cx, cy = (x1 + x2) / 2 * scale + left, (y1 + y2) / 2 * scale + top
    w, h = (x2 - x1) * scale, (y2 - y1) * scale
    raw = np.zeros((4 + len(LABELS), 1), dtype=np.float32)
    raw[:4, 0] = cx, cy, w, h
    raw[4 + 2, 0] = 0.9
    [(cls, score, box)] = postprocess(raw, CONF, IOU, scale, (left, top), shape)
    assert (cls, score) == (2, pytest.approx(0.9))
    assert box == pytest.approx((x1, y1, x2, y2), abs=1e-3)


def test_nms_suppresses_overlaps_of_one_class_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.8, 0.9, 0.7], dtype=np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.9).tolist() == [1, 0, 2]


def test_missing_weights_are_refused_not_downloaded(tmp_path: Path) -> None:
    from common.exceptions import ModelWeightsNotFound

    with pytest.raises(ModelWeightsNotFound, match="not found"):
        YoloOnnxDetector(tmp_path / "nope.onnx", labels=LABELS, imgsz=IMGSZ, conf=CONF, iou=IOU)
