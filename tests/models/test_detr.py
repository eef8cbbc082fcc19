"""The DETR backend on a tiny random checkpoint built offline: microbatches give what each
image gives alone, and boxes come back in pixels of the original image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hepato.common.exceptions import BackendError, ModelWeightsNotFound
from hepato.common.manifest import DetectManifest, load_manifest, parse_manifest
from hepato.common.results import DetectResult
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.detr import Detr
from hepato.worker.builders.detr import DEFAULT_LABELS, build_detr

RUNTIME = Runtime(device="cpu", threads=2)
# Equal-size images batched together differ from each alone only by float32 summation
# order in the batched kernels: measured below 1e-6 in normalised box units (1e-4 px on
# these images) and below 1e-6 in probability.
BOX_TOL_PX = 1e-3
SCORE_TOL = 1e-5
# The reference below recomputes the same model call and post-processing by hand; only
# float32 rounding separates them.
DIRECT_BOX_TOL_PX = 1e-3
DIRECT_SCORE_TOL = 1e-6
# A solid colour resizes to the same input at either scale, so boxes scale exactly by 2
# up to float32 rounding of pixel coordinates (~1e-5 px here).
UPSCALE_TOL_PX = 1e-3

# (height, width): four sizes, three of them repeated, one a strip past the longest-edge
# bound.
SHAPES = [(100, 150), (150, 100), (100, 150), (96, 96), (40, 400), (150, 100), (96, 96), (100, 150)]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> DetectManifest:
    path = build_detr(tmp_path_factory.mktemp("detr"), size="tiny")
    loaded = load_manifest(path)
    assert isinstance(loaded, DetectManifest)
    return loaded


@pytest.fixture(scope="module")
def detr(manifest: DetectManifest) -> Detr:
    return Detr(manifest, RUNTIME)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in SHAPES]


def _as_arrays(result: DetectResult) -> tuple[list[int], np.ndarray, np.ndarray]:
    boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in result.boxes]).reshape(-1, 4)
    return [b.class_id for b in result.boxes], np.array([b.score for b in result.boxes]), boxes


def test_microbatch_equals_each_image_alone(detr: Detr) -> None:
    images = _images()
    batched, sizes, ms = detr.predict(images)
    assert sizes == [3, 2, 3, 2, 1, 2, 2, 3]
    assert ms > 0
    compared = 0
    for image, got in zip(images, batched, strict=True):
        [alone], [size], _ = detr.predict([image])
        assert size == 1
        got_classes, got_scores, got_boxes = _as_arrays(got)
        want_classes, want_scores, want_boxes = _as_arrays(alone)
        assert got_classes == want_classes
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=SCORE_TOL)
        np.testing.assert_allclose(got_boxes, want_boxes, rtol=0, atol=BOX_TOL_PX)
        compared += len(got.boxes)
    assert compared > 20, "a random tiny model should keep boxes at the manifest threshold"


def _direct(detr: Detr, image: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The model on the processor's output, post-processed by hand: normalised cxcywh times
    the original width and height, clipped to the image."""
    height, width = image.shape[:2]
    inputs = detr.processor(
        images=[image], size=detr.size, return_tensors="pt", input_data_format="channels_last"
    )
    side = detr.manifest.input_size
    short, long = sorted(inputs["pixel_values"].shape[-2:])
    # Resized by the short side unless that would pass the long-side bound.
    assert short == side or long == detr.size["longest_edge"]
    with torch.inference_mode():
        out = detr.model(**inputs)
    probability = out.logits[0].softmax(-1)[:, :-1]  # the last class is "no object"
    scores, classes = probability.max(-1)
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)
    boxes = torch.stack(
        [
            ((cx - w / 2) * width).clamp(0, width),
            ((cy - h / 2) * height).clamp(0, height),
            ((cx + w / 2) * width).clamp(0, width),
            ((cy + h / 2) * height).clamp(0, height),
        ],
        dim=-1,
    )
    keep = scores > detr.manifest.options.score_threshold
    order = torch.sort(scores[keep], descending=True, stable=True).indices
    order = order[: detr.manifest.options.max_detections]
    return (
        classes[keep][order].tolist(),
        scores[keep][order].numpy(),
        boxes[keep][order].numpy(),
    )


@pytest.mark.parametrize("shape", [(100, 150), (150, 100), (40, 400), (300, 301)])
def test_boxes_are_in_original_pixels(detr: Detr, shape: tuple[int, int]) -> None:
    image = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    [result], _, _ = detr.predict([image])
    assert result.boxes
    classes, scores, boxes = _as_arrays(result)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    height, width = shape
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert [b.label for b in result.boxes] == [DEFAULT_LABELS[c] for c in classes]
    want_classes, want_scores, want_boxes = _direct(detr, image)
    assert classes == want_classes
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=DIRECT_SCORE_TOL)
    np.testing.assert_allclose(boxes, want_boxes, rtol=0, atol=DIRECT_BOX_TOL_PX)


def test_boxes_scale_with_the_image(detr: Detr) -> None:
    small = np.full((90, 140, 3), (200, 120, 160), dtype=np.uint8)
    large = np.full((180, 280, 3), (200, 120, 160), dtype=np.uint8)
    [got_small, got_large], sizes, _ = detr.predict([small, large])
    assert sizes == [1, 1]
    small_classes, small_scores, small_boxes = _as_arrays(got_small)
    large_classes, large_scores, large_boxes = _as_arrays(got_large)
    assert small_classes and small_classes == large_classes
    np.testing.assert_allclose(large_scores, small_scores, rtol=0, atol=SCORE_TOL)
    np.testing.assert_allclose(large_boxes, 2 * small_boxes, rtol=0, atol=UPSCALE_TOL_PX)


def test_max_detections_keeps_the_best(manifest: DetectManifest, detr: Detr) -> None:
    options = manifest.options.model_copy(update={"max_detections": 3})
    few = Detr(manifest.model_copy(update={"options": options}), RUNTIME)
    image = _images()[0]
    [all_boxes], _, _ = detr.predict([image])
    [best], _, _ = few.predict([image])
    assert len(all_boxes.boxes) > 3
    assert best.boxes == all_boxes.boxes[:3]


def test_missing_checkpoint_is_refused_not_downloaded(tmp_path: Path) -> None:
    manifest = parse_manifest(
        {
            "name": "gone",
            "task": "detect",
            "backend": "transformers",
            "weights": "gone",
            "labels": list(DEFAULT_LABELS),
        },
        tmp_path / "gone.yaml",
    )
    assert isinstance(manifest, DetectManifest)
    with pytest.raises(ModelWeightsNotFound, match="not found"):
        Detr(manifest, RUNTIME)


def test_label_count_mismatch_names_both(manifest: DetectManifest) -> None:
    data = manifest.model_dump(mode="json")
    data["labels"] = ["fibrosis", "steatosis"]
    wrong = parse_manifest(data, manifest.source)
    assert isinstance(wrong, DetectManifest)
    with pytest.raises(BackendError, match=r"4 classes.*2 labels \(fibrosis, steatosis\)"):
        Detr(wrong, RUNTIME)
