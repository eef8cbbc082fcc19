"""A real Triton for these tests: `hepato models export NAME --to triton` writes the demo
detector (its graph as shipped, and with a fixed square input) and the tiny ResNet
classifier (PyTorch, exported to ONNX on the way) into one model repository, and
scripts/triton_serve.py serves it from .venv-triton (made here if missing, as ./dev
test makes it), once per session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from hepato.common.manifest import (
    ClassifyManifest,
    DetectManifest,
    ModelManifest,
    dump_manifest,
    load_manifest,
    load_registry,
)
from hepato.devstack.triton import TritonServer
from tests.conftest import MODELS_DIR

DETECTOR = "hepato-yolov8n"
SQUARE = "hepato-yolov8n-square"  # the same graph with a fixed 320x320 input
SQUARE_IO = ("pixels", "raw")  # its input and output, renamed
CLASSIFIER = "hepato-resnet18-tiny"
# Below the 8 images the classifier tests send: the backend splits a microbatch into
# calls of Triton's batch cap.
CLASSIFIER_BATCH = 4


@dataclass(frozen=True)
class Registry:
    manifests: Path  # the models dir, the ONNX and -triton manifests in it
    repository: Path  # the Triton model repository

    def onnx(self, name: str) -> ModelManifest:
        manifest = load_registry(self.manifests)[name]
        if manifest.backend == "onnx":
            return manifest
        return load_registry(self.manifests)[f"{name}-onnx"]

    def triton(self, name: str) -> ModelManifest:
        return load_registry(self.manifests)[f"{name}-triton"]


@dataclass(frozen=True)
class Served:
    registry: Registry
    server: TritonServer

    def manifest(self, name: str, protocol: Literal["grpc", "http"] = "grpc") -> ModelManifest:
        """The exported manifest, pointed at this server over ``protocol``."""
        manifest = self.registry.triton(name)
        assert isinstance(manifest, DetectManifest | ClassifyManifest) and manifest.triton
        options = manifest.triton.model_copy(
            update={"url": self.server.url(protocol), "protocol": protocol}
        )
        return manifest.model_copy(update={"triton": options})


def export(models_dir: Path, name: str, *extra: str) -> str:
    from typer.testing import CliRunner

    from hepato.cli.main import app

    args = ["models", "export", name, "--to", "triton", "--models-dir", str(models_dir)]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return result.output


def square_graph(source: Path, out: Path, side: int) -> Path:
    """The demo graph with its free height and width fixed, as an export without
    ``dynamic`` would give, and its input and output renamed (SQUARE_IO): the backend
    must take both from Triton."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    for d in graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_value = side
    renames = {graph.input[0].name: SQUARE_IO[0], graph.output[0].name: SQUARE_IO[1]}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    graph.input[0].name, graph.output[0].name = SQUARE_IO
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from hepato.worker.builders.classify import build_classifier

    root = tmp_path_factory.mktemp("triton-registry")
    manifests = root / "manifests"
    manifests.mkdir()
    detector = load_registry(MODELS_DIR)[DETECTOR]
    dump_manifest(
        detector.model_copy(update={"weights": detector.weights_path}),
        manifests / f"{DETECTOR}.yaml",
    )
    square = detector.model_copy(
        update={
            "name": SQUARE,
            "weights": square_graph(
                detector.weights_path, root / "square.onnx", detector.input_size
            ),
        }
    )
    dump_manifest(square, manifests / f"{SQUARE}.yaml")
    built = load_manifest(build_classifier(root / "classify", size="tiny", name=CLASSIFIER))
    classifier = built.model_copy(
        update={"weights": built.weights_path, "max_batch_size": CLASSIFIER_BATCH}
    )
    dump_manifest(classifier, manifests / f"{CLASSIFIER}.yaml")
    for name in (DETECTOR, SQUARE, CLASSIFIER):
        export(manifests, name)
    return Registry(manifests, manifests / "triton")


@pytest.fixture(scope="session")
def served(registry: Registry) -> Iterator[Served]:
    # Two threads for ONNX Runtime in Triton, as the in-process runs they are compared to.
    with TritonServer(registry.repository, threads=2) as server:
        yield Served(registry, server)
