"""Serve a Triton model repository written by `hepato models export NAME --to triton`
with a real Triton Inference Server (PyTriton's tritonserver): each model's 1/model.onnx
on ONNX Runtime inside a bound callable, with the batch cap and dynamic batching its
config.pbtxt declares. For tests and benchmarks where no Triton image with the ONNX
Runtime backend is at hand; production points the worker at its own Triton.

Runs in .venv-triton (PyTriton needs numpy<2; see ./dev triton-venv), so it must not
import hepato. Serves until SIGTERM or SIGINT:

    .venv-triton/bin/python scripts/triton_serve.py REPOSITORY --grpc-port P --http-port Q
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tritonclient.grpc import model_config_pb2

log = logging.getLogger("triton_serve")

# Triton's data types to numpy's, for those an exported detector or classifier uses.
DTYPES: dict[int, Any] = {
    model_config_pb2.TYPE_FP32: np.float32,
    model_config_pb2.TYPE_FP16: np.float16,
    model_config_pb2.TYPE_FP64: np.float64,
    model_config_pb2.TYPE_INT8: np.int8,
    model_config_pb2.TYPE_INT16: np.int16,
    model_config_pb2.TYPE_INT32: np.int32,
    model_config_pb2.TYPE_INT64: np.int64,
    model_config_pb2.TYPE_UINT8: np.uint8,
    model_config_pb2.TYPE_BOOL: np.bool_,
}


def read_config(path: Path) -> Any:
    """config.pbtxt as Triton's own ModelConfig message."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def tensors(entries: Any) -> list[Tensor]:
    return [Tensor(name=e.name, dtype=DTYPES[e.data_type], shape=tuple(e.dims)) for e in entries]


def onnx_callable(graph: Path, outputs: list[str], threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, inputs), strict=True))

    return infer


def bind_repository(triton: Triton, repository: Path, threads: int) -> list[str]:
    names = []
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        config = read_config(config_path)
        name = config.name or config_path.parent.name
        versions = sorted(
            (int(p.name) for p in config_path.parent.iterdir() if p.name.isdigit()), reverse=True
        )
        if not versions:
            raise SystemExit(f"{config_path.parent}: no version directory")
        graph = config_path.parent / str(versions[0]) / "model.onnx"
        outputs = [o.name for o in config.output]
        batcher = DynamicBatcher(
            max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds
        )
        triton.bind(
            model_name=name,
            infer_func=onnx_callable(graph, outputs, threads),
            inputs=tensors(config.input),
            outputs=tensors(config.output),
            model_version=versions[0],
            config=ModelConfig(
                max_batch_size=config.max_batch_size,
                batching=config.max_batch_size > 0,
                batcher=batcher,
            ),
        )
        names.append(name)
    if not names:
        raise SystemExit(f"no */config.pbtxt in {repository}")
    return names


def libpython_on_path() -> None:
    """The Python backend's stub links libpython3.X; it must find this interpreter's
    (the system may have an older one of the same minor version, whose C modules
    clash with this interpreter's standard library)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in paths.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{paths}" if paths else libdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads; 0: all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    libpython_on_path()

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # serve() stops Triton and its stubs on it

    signal.signal(signal.SIGTERM, interrupt)
    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        allow_metrics=False,
        exit_timeout_secs=5,
    )
    with tempfile.TemporaryDirectory(prefix="triton-serve-") as workspace:
        triton = Triton(config=config, workspace=Path(workspace) / "ws")
        names = bind_repository(triton, args.repository, args.threads)
        log.info("serving %s on gRPC %d, HTTP %d", names, args.grpc_port, args.http_port)
        triton.serve()


if __name__ == "__main__":
    main()
