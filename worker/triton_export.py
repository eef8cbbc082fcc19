"""A Triton model repository from an ONNX detector or classifier: ``config.pbtxt`` read
off the graph, the graph as version 1, and the manifest of the model served from it
(backend triton: Triton runs the graph, the worker keeps the pre- and post-processing)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hepato.common.manifest import (
    ClassifyManifest,
    DetectManifest,
    ModelManifest,
    TritonOptions,
)

# ONNX Runtime's element types to Triton's.
DATA_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
}
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
PLATFORM = "onnxruntime_onnx"
GRAPH_FILE = "model.onnx"
VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as config.pbtxt declares it: dims without the batch axis, -1
    where the graph leaves a dimension free."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Exported:
    manifest: ModelManifest  # backend triton, for the registry
    model_dir: Path  # repository/<triton name>


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs. Each must lead with a free batch axis: Triton's
    dynamic batcher stacks requests along it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def spec(arg: object) -> TensorSpec:
        name, kind, shape = arg.name, arg.type, list(arg.shape)  # type: ignore[attr-defined]
        if kind not in DATA_TYPES:
            raise ValueError(f"{path}: {name} is a {kind}, which Triton's config cannot name")
        if not shape or isinstance(shape[0], int):
            raise ValueError(
                f"{path}: {name} has no free batch axis (shape {shape}); export with a "
                "dynamic batch axis"
            )
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
        return TensorSpec(name, DATA_TYPES[kind], dims)

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def _tensors(specs: list[TensorSpec]) -> str:
    entries = [
        f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n'
        f"    dims: [ {', '.join(map(str, s.dims))} ]\n  }}"
        for s in specs
    ]
    return ",\n".join(entries)


def config_text(
    name: str,
    manifest: ModelManifest,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    instances: int = 1,
    queue_delay_us: int = 0,
) -> str:
    """config.pbtxt (protobuf text of Triton's ModelConfig) with the manifest's batch cap.
    The queue delay is 0 by default: a worker sends whole microbatches it has already
    waited for, and waiting again in Triton cost a lone worker's batch-1 calls a third of
    their throughput (`hepato bench models --triton`). Triton's dynamic batcher still
    merges calls that arrive together; a delay pays only when many workers share a server
    and send small microbatches."""
    delay_us = queue_delay_us
    return (
        f'name: "{name}"\n'
        f'platform: "{PLATFORM}"\n'
        f"max_batch_size: {manifest.max_batch_size}\n"
        f"input [\n{_tensors(inputs)}\n]\n"
        f"output [\n{_tensors(outputs)}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {delay_us}\n"
        "}\n"
        # KIND_AUTO: the GPUs when the server has them, else the CPU.
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_AUTO\n  }}\n]\n"
    )


def export_triton(
    manifest: ModelManifest,
    repository: Path,
    *,
    triton_name: str | None = None,
    url: str | None = None,
    protocol: Literal["grpc", "http"] = "grpc",
    timeout_s: float | None = None,
    queue_delay_us: int = 0,
) -> Exported:
    """Write ``repository/<triton_name>/{config.pbtxt, 1/model.onnx}`` for an ONNX
    detector or classifier and return the manifest of the model Triton serves from it,
    named ``<triton_name>-triton`` (the caller writes it). ``triton_name`` defaults to
    the manifest's name; the CLI passes the name it was given, which for a PyTorch model
    is not the name of its ONNX export."""
    if not isinstance(manifest, DetectManifest | ClassifyManifest) or manifest.backend != "onnx":
        raise ValueError(
            f"model {manifest.name!r} is a {manifest.task} model on {manifest.backend}; a "
            "Triton repository takes ONNX detectors and classifiers (export to ONNX first)"
        )
    graph = manifest.weights_path
    if not graph.is_file():
        raise FileNotFoundError(f"model {manifest.name!r}: no ONNX graph at {graph}")
    name = triton_name or manifest.name
    inputs, outputs = graph_io(graph)
    if len(inputs) != 1:
        raise ValueError(f"{graph}: the worker sends one image tensor; the graph takes {inputs}")
    model_dir = repository / name
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(graph, model_dir / VERSION / GRAPH_FILE)
    (model_dir / "config.pbtxt").write_text(
        config_text(name, manifest, inputs, outputs, queue_delay_us=queue_delay_us)
    )
    options = TritonOptions(
        url=url or f"localhost:{DEFAULT_PORTS[protocol]}",
        model_name=name,
        protocol=protocol,
        **({"timeout_s": timeout_s} if timeout_s is not None else {}),
    )
    fields = manifest.model_dump()
    fields.update(
        name=f"{name}-triton",
        backend="triton",
        weights=None,
        triton=options.model_dump(),
        description=f"{manifest.description or manifest.name}, served by Triton".strip(),
    )
    # Validated anew: the longer name must still be a valid model name.
    served = type(manifest).model_validate(fields)
    return Exported(served, model_dir)
