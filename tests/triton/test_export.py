"""`hepato models export NAME --to triton`: a repository entry Triton's own ModelConfig
parses, with the manifest's batch cap and straggler wait as Triton's dynamic batching,
the graph's names, types and dims without the batch axis; the graph as version 1; and a
manifest NAME-triton that the registry loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from hepato.common.manifest import ClassifyManifest, DetectManifest, load_registry
from tests.triton.conftest import CLASSIFIER, DETECTOR, SQUARE, Registry, export


def parsed(registry: Registry, name: str) -> model_config_pb2.ModelConfig:
    text = (registry.repository / name / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", [DETECTOR, SQUARE, CLASSIFIER])
def test_config_is_triton_model_config_with_the_manifests_batching(
    registry: Registry, name: str
) -> None:
    config = parsed(registry, name)
    source = registry.onnx(name)
    assert config.name == name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == source.max_batch_size
    assert config.HasField("dynamic_batching")
    # No second straggler wait in Triton by default: the worker sends whole microbatches.
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    ]
    session = ort.InferenceSession(str(source.weights_path), providers=["CPUExecutionProvider"])
    for declared, actual in [
        (config.input, session.get_inputs()),
        (config.output, session.get_outputs()),
    ]:
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual, strict=True):
            assert t.data_type == model_config_pb2.TYPE_FP32 and a.type == "tensor(float)"
            # The batch axis is Triton's; a free dimension is -1.
            assert list(t.dims) == [d if isinstance(d, int) else -1 for d in a.shape[1:]]
    graph = registry.repository / name / "1" / "model.onnx"
    assert graph.read_bytes() == source.weights_path.read_bytes()


def test_dims_of_the_shipped_detector_and_the_classifier(registry: Registry) -> None:
    detector, square, classifier = (parsed(registry, n) for n in (DETECTOR, SQUARE, CLASSIFIER))
    assert list(detector.input[0].dims) == [3, -1, -1]
    assert list(square.input[0].dims) == [3, 320, 320]
    side = registry.onnx(CLASSIFIER).input_size
    assert list(classifier.input[0].dims) == [3, side, side]
    assert list(classifier.output[0].dims) == [len(registry.onnx(CLASSIFIER).labels)]


@pytest.mark.parametrize("name", [DETECTOR, CLASSIFIER])
def test_the_exported_manifest_names_triton(registry: Registry, name: str) -> None:
    served = registry.triton(name)
    source = registry.onnx(name)
    assert isinstance(served, DetectManifest | ClassifyManifest)
    assert served.name == f"{name}-triton" and served.backend == "triton"
    assert served.weights is None and served.weights_present
    assert served.triton is not None
    assert (served.triton.url, served.triton.protocol) == ("localhost:8001", "grpc")
    assert served.triton.model_name == name
    for field in ("labels", "input_size", "max_batch_size", "max_wait_ms", "options"):
        assert getattr(served, field) == getattr(source, field), field


def test_a_pytorch_classifier_is_exported_to_onnx_on_the_way(registry: Registry) -> None:
    """CLASSIFIER is a torch model: its ONNX export and manifest sit beside it."""
    registry_now = load_registry(registry.manifests)
    assert registry_now[CLASSIFIER].backend == "torch"
    assert registry_now[f"{CLASSIFIER}-onnx"].backend == "onnx"


def test_url_protocol_and_repository_are_options(registry: Registry, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shutil.copy(registry.manifests / f"{DETECTOR}.yaml", manifests)
    out = export(
        manifests,
        DETECTOR,
        "--repository",
        str(tmp_path / "repo"),
        "--url",
        "triton.internal:8000",
        "--protocol",
        "http",
        "--queue-delay-us",
        "2500",
    )
    assert str(tmp_path / "repo" / DETECTOR) in out
    config = (tmp_path / "repo" / DETECTOR / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 2500" in config
    assert not (manifests / "triton").exists()
    served = load_registry(manifests)[f"{DETECTOR}-triton"]
    assert isinstance(served, DetectManifest) and served.triton is not None
    assert (served.triton.url, served.triton.protocol) == ("triton.internal:8000", "http")


def test_models_triton_cannot_serve_are_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hepato.cli.main import app
    from tests.conftest import MODELS_DIR

    args = ["models", "export", "null", "--to", "triton", "--models-dir", str(MODELS_DIR)]
    result = CliRunner().invoke(app, [*args, "--repository", str(tmp_path)])
    assert result.exit_code == 2
    assert "null is a detect model on null" in result.output
    assert not any(tmp_path.iterdir())
