"""`hepato bench models --triton`: each ONNX model measured in process is measured again
through a Triton the bench starts itself, over both protocols, at the same batch."""

from __future__ import annotations

from hepato.bench.models import measure
from hepato.bench.triton_hop import bench_triton, servable
from hepato.worker.backends.base import Runtime, load_model
from tests.models.test_yolo import sample_images
from tests.triton.conftest import CLASSIFIER, DETECTOR, Registry

RUNTIME = Runtime(device="cpu", threads=1)


def test_the_hop_is_measured_per_protocol_at_the_same_batch(registry: Registry) -> None:
    detector, classifier = registry.onnx(DETECTOR), registry.onnx(CLASSIFIER)
    torch_classifier = registry.onnx(CLASSIFIER).model_copy(update={"backend": "torch"})
    assert servable([detector, classifier, torch_classifier]) == [detector, classifier]
    _, images = sample_images()
    local = [measure(load_model(detector, RUNTIME), images, 2, 0.0, 1)]
    hops = bench_triton([detector], local, RUNTIME, images, min_seconds=0.0, min_calls=1)
    assert [(h.protocol, h.local.batch, h.triton.batch) for h in hops] == [
        ("grpc", 2, 2),
        ("http", 2, 2),
    ]
    for hop in hops:
        assert hop.triton.backend == "triton" and hop.triton.model == f"{DETECTOR}-triton"
        assert hop.ratio == hop.triton.images_per_s / hop.local.images_per_s > 0
        assert hop.as_dict()["model"] == DETECTOR
