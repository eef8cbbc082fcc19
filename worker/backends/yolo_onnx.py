"""YOLOv8 detection on ONNX Runtime, without ultralytics or torch at run time: our own
letterbox and NMS, written to give what ultralytics' predictor gives for the same weights.
Images are RGB; the letterbox grey is the same in every channel order."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from hepato.common.exceptions import BackendError
from hepato.common.manifest import DetectManifest
from hepato.common.results import DetectResult, TaskResult, make_box
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.calls import (
    Prediction,
    Prepared,
    finish_groups,
    predict_phased,
    prepare_by_shape,
)
from hepato.worker.backends.onnx_runtime import session

PAD_VALUE = 114  # ultralytics' letterbox grey
MAX_WH = 7680.0  # class offset for per-class NMS in one pass (as ultralytics)
MAX_NMS = 30000  # candidates kept before NMS


def letterbox(
    image: np.ndarray, size: int, *, auto: bool, stride: int = 32
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio and pad with grey, centred. ``auto`` pads only to a
    multiple of ``stride`` (ultralytics' minimal rectangle); otherwise to ``size`` square.
    Returns the image, the scale and the (left, top) padding."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = size - new_w, size - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh / 2 - 0.1), round(dh / 2 + 0.1)
    left, right = round(dw / 2 - 0.1), round(dw / 2 + 0.1)
    image = cv2.copyMakeBorder(
        image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return image, r, (left, top)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS over boxes sorted by score, each step vectorised over the rest.
    Returns the kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    output: np.ndarray,
    conf: float,
    iou: float,
    scale: float,
    pad: tuple[int, int],
    original: tuple[int, int],
    *,
    max_det: int = 300,
) -> list[tuple[int, float, tuple[float, float, float, float]]]:
    """One image's raw output (4 + classes, anchors) to (class, score, box) in pixels of
    the original image."""
    pred = output.T
    scores_all = pred[:, 4:]
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    mask = score > conf
    pred, cls, score = pred[mask], cls[mask], score[mask]
    if not len(score):
        return []
    top = np.argsort(-score, kind="stable")[:MAX_NMS]
    pred, cls, score = pred[top], cls[top], score[top]
    xy, wh = pred[:, :2], pred[:, 2:4]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    keep = nms(boxes + cls[:, None] * MAX_WH, score, iou)[:max_det]
    boxes, cls, score = boxes[keep], cls[keep], score[keep]
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad[0]) / scale
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad[1]) / scale
    h, w = original
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return [
        (int(c), float(s), (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
        for c, s, b in zip(cls, score, boxes, strict=True)
    ]


class Yolo:
    """YOLOv8's pre- and post-processing around one model call per equal-shape group,
    ``infer``, which each runtime gives (ONNX Runtime here, Triton in triton.py). Images
    are letterboxed as ultralytics does: to their minimal rectangle for a graph with a
    dynamic input, to the square for one exported with a fixed input."""

    def __init__(self, manifest: DetectManifest, *, square: bool) -> None:
        self.manifest = manifest
        self.options = manifest.options
        self.square = square

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """One group's NCHW float32 batch to the graph's first output."""
        raise NotImplementedError

    def predict(self, images: list[np.ndarray]) -> Prediction[TaskResult]:
        return predict_phased(self, images)

    # The three phases the worker runs in separate stages (see worker/runner.py).
    def prepare(self, images: list[np.ndarray]) -> Prepared[_Letterboxed]:
        return prepare_by_shape(images, self._letterbox)

    def run(self, prepared: Prepared[_Letterboxed]) -> list[np.ndarray]:
        return [self.infer(group.tensor) for _, group in prepared.groups]

    def finish(
        self, prepared: Prepared[_Letterboxed], raws: list[np.ndarray]
    ) -> tuple[list[TaskResult], list[int]]:
        return finish_groups(prepared, raws, self._boxes)

    def _letterbox(self, images: list[np.ndarray]) -> _Letterboxed:
        size, auto = self.manifest.input_size, not self.square
        boxed = [letterbox(image, size, auto=auto) for image in images]
        batch = np.stack([b[0] for b in boxed]).transpose(0, 3, 1, 2)
        tensor = np.ascontiguousarray(batch, dtype=np.float32) / 255.0
        return _Letterboxed(
            tensor,
            [
                (scale, pad, image.shape[:2])
                for (_, scale, pad), image in zip(boxed, images, strict=True)
            ],
        )

    def _boxes(self, group: _Letterboxed, raw: np.ndarray) -> list[TaskResult]:
        labels, o = self.manifest.labels, self.options
        out: list[TaskResult] = []
        for k, (scale, pad, original) in enumerate(group.placement):
            found = postprocess(
                raw[k],
                o.score_threshold,
                o.iou,
                scale,
                pad,
                original,
                max_det=o.max_detections,
            )
            out.append(DetectResult(boxes=[make_box(labels, c, s, b) for c, s, b in found]))
        return out


@dataclass(frozen=True)
class _Letterboxed:
    """One equal-shape group as the model takes it, and how to map boxes back."""

    tensor: np.ndarray
    placement: list[tuple[float, tuple[int, int], tuple[int, int]]]  # scale, pad, (h, w)


def fixed_square(manifest: DetectManifest, height: object, width: object) -> bool:
    """Whether a graph's input (its height and width: an int when fixed) is a fixed
    square, which must then be the manifest's input_size; False when both are dynamic."""
    fixed = [d for d in (height, width) if isinstance(d, int) and d > 0]
    if not fixed:
        return False
    if fixed != [manifest.input_size] * 2:
        raise BackendError(
            f"model {manifest.name!r}: the graph takes {height}x{width} images; a fixed "
            f"input must be the manifest's input_size square ({manifest.input_size})"
        )
    return True


class YoloOnnx(Yolo):
    """YOLOv8 on ONNX Runtime, giving what ultralytics gives for the same weights."""

    def __init__(self, manifest: DetectManifest, runtime: Runtime) -> None:
        self.session = session(manifest, runtime)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        super().__init__(manifest, square=fixed_square(manifest, *graph_input.shape[2:4]))

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: tensor})[0])
