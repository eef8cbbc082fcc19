"""The triton backend against a real Triton serving the exported repository: over gRPC
and over HTTP, a microbatch gives what ONNX Runtime in the worker gives for the same
graph, within the tolerances of tests/models, for the demo detector (mixed sizes, one
call per size; its graph dynamic and fixed-square) and the tiny ResNet classifier (more
images than Triton's batch cap)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from hepato.worker.backends.base import Runtime, load_model
from hepato.worker.backends.classify import ResNetOnnx
from hepato.worker.backends.triton import ResNetTriton, YoloTriton
from hepato.worker.backends.yolo_onnx import YoloOnnx
from tests.models.test_classify import BATCH_TOL, SHAPES, probabilities
from tests.models.test_yolo import assert_same, boxes, sample_images
from tests.triton.conftest import (
    CLASSIFIER,
    CLASSIFIER_BATCH,
    DETECTOR,
    SQUARE,
    SQUARE_IO,
    Served,
)

RUNTIME = Runtime(device="cpu", threads=2)


def mixed_images() -> tuple[list[str], list[np.ndarray]]:
    """The samples (squares of three sizes) and crops of two of them that are not
    square, so letterboxing to a minimal rectangle and to a square differ."""
    names, images = sample_images()
    crops = [images[0][:200], images[1][:, :150], images[2][:200]]
    return [*names, "wide-a", "tall", "wide-b"], [*images, *crops]


PROTOCOLS: list[Literal["grpc", "http"]] = ["grpc", "http"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_detector_through_triton_equals_onnx_runtime(
    served: Served, protocol: Literal["grpc", "http"]
) -> None:
    model = load_model(served.manifest(DETECTOR, protocol), RUNTIME)
    assert isinstance(model, YoloTriton)
    assert not model.square, "the shipped graph's height and width are free"
    local = YoloOnnx(served.registry.onnx(DETECTOR), RUNTIME)
    names, images = mixed_images()
    assert len({im.shape for im in images}) >= 5, "a microbatch of mixed sizes"
    got, sizes, ms = model.predict(images)
    want, want_sizes, _ = local.predict(images)
    assert sizes == want_sizes and max(sizes) > 1, "one call per image size, as in-process"
    assert ms > 0
    assert sum(len(boxes(r)) for r in want) > 20
    for name, g, w in zip(names, got, want, strict=True):
        assert_same(g, w, name)


def test_a_fixed_square_graph_is_letterboxed_to_its_square(served: Served) -> None:
    model = load_model(served.manifest(SQUARE), RUNTIME)
    local = YoloOnnx(served.registry.onnx(SQUARE), RUNTIME)
    assert isinstance(model, YoloTriton) and model.square and local.square
    names, images = mixed_images()
    prepared = model.prepare(images)
    side = model.manifest.input_size
    assert {g.tensor.shape[2:] for _, g in prepared.groups} == {(side, side)}
    got, _, _ = model.predict(images)
    want, _, _ = local.predict(images)
    assert sum(len(boxes(r)) for r in want) > 20
    for name, g, w in zip(names, got, want, strict=True):
        assert_same(g, w, name)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classifier_through_triton_equals_onnx_runtime(
    served: Served, protocol: Literal["grpc", "http"]
) -> None:
    model = load_model(served.manifest(CLASSIFIER, protocol), RUNTIME)
    assert isinstance(model, ResNetTriton)
    assert model.graph.max_batch_size == CLASSIFIER_BATCH < len(SHAPES)
    local = ResNetOnnx(served.registry.onnx(CLASSIFIER), RUNTIME)
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]
    got, sizes, _ = model.predict(images)
    want, _, _ = local.predict(images)
    assert sizes == [len(images)] * len(images), "one microbatch, however Triton splits it"
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(probabilities(g), probabilities(w), atol=BATCH_TOL)


def test_names_and_shapes_come_from_triton(served: Served) -> None:
    for name, io, shape in [
        (DETECTOR, ("images", "output0"), (-1, 3, -1, -1)),
        (SQUARE, SQUARE_IO, (-1, 3, 320, 320)),
    ]:
        model = load_model(served.manifest(name, "http"), RUNTIME)
        assert isinstance(model, YoloTriton)
        graph = model.graph
        assert (graph.input.name, graph.output.name) == io
        assert (graph.input.datatype, graph.input.shape) == ("FP32", shape)
        assert graph.max_batch_size == model.manifest.max_batch_size
