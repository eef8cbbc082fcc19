"""Models served by NVIDIA Triton: the worker keeps its own pre- and post-processing
(YOLOv8's letterbox and NMS, the ResNet's resize and softmax) and sends each model call's
tensor to Triton with tritonclient, over gRPC or HTTP as the manifest says.

Names, shapes and the batch cap come from Triton's model metadata and config at load, so
any exported name works. A Triton that cannot be reached is tried again as the object
store is (a few quick retries); then ModelUnavailable sends the microbatch back to the
queue whole (worker/inference.py), like a store outage, with no image blamed for it."""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from hepato.common.exceptions import BackendError, ModelUnavailable
from hepato.common.manifest import ClassifyManifest, DetectManifest, ModelManifest
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.classify import ResNetGraph
from hepato.worker.backends.yolo_onnx import Yolo, fixed_square

log = logging.getLogger(__name__)

# Answers that mean "not now" rather than "not this request": the server or its model
# is down, starting, reloading or overloaded. A request Triton refuses (a wrong shape)
# or a model that raised is not among them: the worker looks for a culprit image instead.
TRANSIENT_GRPC = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "NOT_FOUND", "ABORTED")
TRANSIENT_HTTP = ("429", "502", "503", "504")
# A model Triton has not (yet) loaded, as each protocol words it.
NOT_LOADED = ("unknown model", "is not ready", "has no available versions")
TIMED_OUT = ("DEADLINE_EXCEEDED", "Deadline Exceeded", "timed out")


# tritonclient's own gRPC channel options, plus a bound on the channel's reconnect
# backoff: gRPC's grows to 120 s while a server is down, and calls fail at once until the
# next reconnect, so a Triton back after a long outage would stay unused for minutes.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(frozen=True)
class TritonRetry:
    """How an unreachable Triton is tried again: the object store's policy
    (common/storage.py: 3 retries, 0.2 s backoff doubling), so a restart of either
    costs a microbatch the same seconds before its jobs go back to the queue."""

    attempts: int = 4
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else "")


def timed_out(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or any(
        t in _status(exc) or t in str(exc) for t in TIMED_OUT
    )


def transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: the connection failed or Triton said so."""
    if isinstance(exc, OSError):  # refused, reset, unreachable, timed out
        return True
    # The HTTP client's own transport errors: a connection closed mid-answer (a Triton
    # killed or restarting), an answer that is not HTTP.
    if any(c.__module__.startswith("geventhttpclient") for c in type(exc).__mro__):
        return True
    status, message = _status(exc), str(exc)
    if any(s in status for s in TRANSIENT_GRPC) or status in TRANSIENT_HTTP:
        return True
    return any(m in message for m in NOT_LOADED) or timed_out(exc)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch axis; -1 where free


class TritonGraph:
    """One model in one Triton, called as the worker calls a graph: a batch in, the first
    output back. Every client call runs on one thread of its own: the HTTP client
    (gevent) must stay on the thread that made it, and the worker makes a thread per
    model call (worker/inference.py, to cut a hung call)."""

    def __init__(self, manifest: ModelManifest, retry: TritonRetry | None = None) -> None:
        options = getattr(manifest, "triton", None)
        if options is None:
            raise BackendError(f"model {manifest.name!r} has no triton section")
        self.options = options
        self.name = manifest.name
        self.retry = retry or TritonRetry()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"triton-{manifest.name}")
        self._module: Any = None
        self._client: Any = self._on_thread(self._connect)
        metadata, config = self._call("model metadata", self._describe)
        inputs = [self._tensor(t) for t in metadata["inputs"]]
        if len(inputs) != 1:
            raise BackendError(f"{self._where()}: takes {len(inputs)} inputs; the worker sends 1")
        self.input = inputs[0]
        self.output = self._tensor(metadata["outputs"][0])
        if self.input.datatype != "FP32":
            raise BackendError(f"{self._where()}: input is {self.input.datatype}, not FP32")
        self.max_batch_size = int(config.get("max_batch_size", 0))
        if self.max_batch_size < 1:
            # Its input would then have no batch axis: not what an export of ours gives.
            raise BackendError(f"{self._where()}: Triton does not batch it (max_batch_size 0)")
        log.info(
            "model %s: Triton %s over %s, input %s %s, output %s, batches up to %d",
            self.name,
            self._where(),
            options.protocol,
            self.input.name,
            list(self.input.shape),
            self.output.name,
            self.max_batch_size,
        )

    @property
    def image_dims(self) -> tuple[int, ...]:
        """The input's (channels, height, width), -1 where free."""
        return self.input.shape[1:]

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """The graph's first output for a batch, sent in pieces of Triton's batch cap."""
        parts = range(0, len(tensor), self.max_batch_size)
        outs = [self._send(tensor[i : i + self.max_batch_size]) for i in parts]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def close(self) -> None:
        self._thread.shutdown(wait=False)

    # --- calls -----------------------------------------------------------------------
    def _send(self, tensor: np.ndarray) -> np.ndarray:
        tensor = np.ascontiguousarray(tensor)
        return np.asarray(self._call("inference", lambda: self._request(tensor)))

    def _call(self, what: str, call: Any) -> Any:
        """``call`` on the client's thread, an unreachable Triton retried, each failed
        attempt logged; a call that ran out of time is not repeated (Triton has it, and
        may be only slow)."""
        r = self.retry

        def failed(state: RetryCallState) -> None:
            log.warning(
                "Triton %s unavailable for %s of %s (attempt %d of %d): %s",
                self._where(),
                what,
                self.name,
                state.attempt_number,
                r.attempts,
                state.outcome.exception() if state.outcome else "",
            )

        retrying = Retrying(
            stop=stop_after_attempt(r.attempts),
            wait=wait_exponential(multiplier=r.backoff_s, max=r.backoff_max_s),
            retry=retry_if_exception(lambda e: transient(e) and not timed_out(e)),
            after=failed,
            reraise=True,
        )
        try:
            return retrying(self._on_thread, call)
        except Exception as exc:
            if not transient(exc):
                raise
            tries = int(retrying.statistics.get("attempt_number", 1))
            raise ModelUnavailable(
                f"Triton at {self._where()} unavailable for {what} of model {self.name!r} "
                f"after {tries} attempt{'s' if tries > 1 else ''}: {type(exc).__name__}: {exc}"
            ) from exc

    def _on_thread(self, call: Any) -> Any:
        return self._thread.submit(call).result()

    def _where(self) -> str:
        version = f" version {self.options.model_version}" if self.options.model_version else ""
        return f"{self.options.url} ({self.options.model_name}{version})"

    def _connect(self) -> Any:
        o = self.options
        try:
            module = importlib.import_module(f"tritonclient.{o.protocol}")
        except ImportError as exc:
            raise BackendError(
                f"model {self.name!r} is served by Triton; install hepato[triton] ({exc})"
            ) from exc
        self._module = module
        if o.protocol == "grpc":
            return module.InferenceServerClient(o.url, channel_args=CHANNEL_ARGS)
        return module.InferenceServerClient(
            o.url, connection_timeout=o.timeout_s, network_timeout=o.timeout_s
        )

    def _describe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        o, c = self.options, self._client
        if o.protocol == "grpc":
            kw: dict[str, Any] = {"as_json": True, "client_timeout": o.timeout_s}
            config = c.get_model_config(o.model_name, o.model_version, **kw)["config"]
            return c.get_model_metadata(o.model_name, o.model_version, **kw), config
        return (
            c.get_model_metadata(o.model_name, o.model_version),
            c.get_model_config(o.model_name, o.model_version),
        )

    @staticmethod
    def _tensor(entry: dict[str, Any]) -> Tensor:
        # gRPC's JSON gives the int64 dims as strings.
        return Tensor(entry["name"], entry["datatype"], tuple(int(d) for d in entry["shape"]))

    def _request(self, tensor: np.ndarray) -> np.ndarray:
        o, m = self.options, self._module
        given = m.InferInput(self.input.name, list(tensor.shape), self.input.datatype)
        given.set_data_from_numpy(tensor)
        wanted = [m.InferRequestedOutput(self.output.name)]
        timeout = {"client_timeout": o.timeout_s} if o.protocol == "grpc" else {}
        answer = self._client.infer(
            o.model_name, [given], model_version=o.model_version, outputs=wanted, **timeout
        )
        return np.asarray(answer.as_numpy(self.output.name))


def _check_dims(graph: TritonGraph, manifest: ModelManifest) -> tuple[int, int]:
    dims = graph.image_dims
    if len(dims) != 3 or dims[0] not in (3, -1):
        raise BackendError(f"model {manifest.name!r}: Triton's input is {dims}, not (3, H, W)")
    return dims[1], dims[2]


class YoloTriton(Yolo):
    """YOLOv8 served by Triton (an exported ONNX graph); letterbox and NMS here, so
    results are those of YoloOnnx on the same graph."""

    def __init__(
        self, manifest: DetectManifest, runtime: Runtime, retry: TritonRetry | None = None
    ) -> None:
        self.graph = TritonGraph(manifest, retry)
        height, width = _check_dims(self.graph, manifest)
        super().__init__(manifest, square=fixed_square(manifest, height, width))

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        return self.graph.infer(tensor)


class ResNetTriton(ResNetGraph):
    """A ResNet classifier served by Triton; resize, normalisation and softmax here."""

    def __init__(
        self, manifest: ClassifyManifest, runtime: Runtime, retry: TritonRetry | None = None
    ) -> None:
        self.manifest = manifest
        self.graph = TritonGraph(manifest, retry)
        height, width = _check_dims(self.graph, manifest)
        if {height, width} - {-1, manifest.input_size}:
            raise BackendError(
                f"model {manifest.name!r}: Triton takes {height}x{width} images, the "
                f"manifest's input_size is {manifest.input_size}"
            )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.graph.infer(batch)
