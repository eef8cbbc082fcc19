"""How closely a quantized model's results agree with its float original's on the same
images: top-1 agreement for classifiers, box recall and precision for detectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hepato.common.results import Box, ClassifyResult, DetectResult, TaskResult

# A box is found again when the other model has one of the same class overlapping it by
# this much (the usual detection-matching IoU, as in mAP@0.5).
MATCH_IOU = 0.5


@dataclass(frozen=True)
class Agreement:
    """``value`` is the figure a threshold applies to, a fraction in [0, 1]; ``compared``
    counts what it was computed over (the float model's boxes, or images)."""

    value: float
    compared: int
    summary: str


def box_iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = w * h
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def matched_boxes(
    reference: Sequence[Box], candidate: Sequence[Box], iou: float = MATCH_IOU
) -> int:
    """How many reference boxes have a candidate of the same class at IoU >= ``iou``,
    each candidate matching at most one reference box. Greedy, best-scored reference box
    first, each taking its best-overlapping free candidate (as COCO's evaluation does)."""
    free = list(range(len(candidate)))
    matched = 0
    for ref in sorted(reference, key=lambda b: -b.score):
        best, best_iou = -1, iou
        for j in free:
            cand = candidate[j]
            if cand.class_id != ref.class_id:
                continue
            overlap = box_iou(ref, cand)
            if overlap >= best_iou:
                best, best_iou = j, overlap
        if best >= 0:
            free.remove(best)
            matched += 1
    return matched


def detect_agreement(
    reference: Sequence[TaskResult], candidate: Sequence[TaskResult], iou: float = MATCH_IOU
) -> Agreement:
    """Box recall (the reference's boxes found again by the candidate) and precision (the
    candidate's boxes that the reference has too), image by image, same class, IoU >=
    ``iou``. The value is the lower of the two: a model that loses boxes and one that
    invents them both disagree. With no boxes on either side there is nothing to miss
    (1.0)."""
    n_ref = n_cand = matched = 0
    for ref, cand in zip(reference, candidate, strict=True):
        if not isinstance(ref, DetectResult) or not isinstance(cand, DetectResult):
            raise TypeError("detect_agreement compares detection results")
        n_ref += len(ref.boxes)
        n_cand += len(cand.boxes)
        matched += matched_boxes(ref.boxes, cand.boxes, iou)
    recall = matched / n_ref if n_ref else 1.0
    precision = matched / n_cand if n_cand else 1.0
    return Agreement(
        min(recall, precision),
        n_ref,
        f"box recall {recall:.1%}, precision {precision:.1%} at IoU {iou:g}, same class "
        f"({matched} of {n_ref} float boxes found, {n_cand} INT8 boxes, "
        f"{len(reference)} images)",
    )


def classify_agreement(
    reference: Sequence[TaskResult], candidate: Sequence[TaskResult]
) -> Agreement:
    """The fraction of images whose most probable class is the same; the summary adds the
    largest probability difference of any class on any image."""
    same, largest = 0, 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        if not isinstance(ref, ClassifyResult) or not isinstance(cand, ClassifyResult):
            raise TypeError("classify_agreement compares classification results")
        same += ref.labels[0].class_id == cand.labels[0].class_id
        probs = {e.class_id: e.probability for e in cand.labels}
        largest = max([largest, *(abs(e.probability - probs[e.class_id]) for e in ref.labels)])
    n = len(reference)
    value = same / n if n else 1.0
    return Agreement(
        value,
        n,
        f"top-1 agreement {value:.1%} ({same} of {n} images), largest probability "
        f"difference {largest:.4f}",
    )


def agreement(
    task: str, reference: Sequence[TaskResult], candidate: Sequence[TaskResult]
) -> Agreement:
    if task == "detect":
        return detect_agreement(reference, candidate)
    if task == "classify":
        return classify_agreement(reference, candidate)
    raise ValueError(f"no agreement measure for {task} models")
