"""Image decoding for the models, isolated from the worker.

OpenCV decodes (the decoder ultralytics itself uses for files, so the PyTorch YOLO backend
sees exactly the pixels it would from a path); models get RGB. A hostile or broken file
can crash or hang a C decoder, so decoding runs in a pool of child processes with a time
bound: the worker survives either, and the job is retried, then failed."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import cv2
import numpy as np

from hepato.common.exceptions import InvalidImage

log = logging.getLogger(__name__)

Decode = Callable[[bytes], np.ndarray]


class DecoderFault(Exception):
    """The decoder process crashed or ran out of time on this image (worth a retry: the
    cause may be the machine, not the file)."""


def decode_rgb(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise InvalidImage("the image could not be decoded (corrupt or truncated file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class IsolatedDecoder:
    """Decodes a microbatch in child processes. ``decode`` must be importable by name (it
    runs in a spawned process)."""

    def __init__(self, processes: int, timeout_s: float, decode: Decode = decode_rgb) -> None:
        self.processes, self.timeout_s, self.decode = processes, timeout_s, decode
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self, processes: int | None = None) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the worker has runtime threads (ONNX Runtime, torch) that a
            # forked child would inherit in an unknown state.
            self._pool = ProcessPoolExecutor(
                processes or self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # A hung child never returns; Python 3.11's executor has no public way to kill it.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def warm(self) -> None:
        """Start the child processes now rather than on the first batch."""
        self.decode_all([cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1].tobytes()])

    def close(self) -> None:
        self._kill_pool()

    def decode_all(self, datas: Sequence[bytes]) -> list[np.ndarray | InvalidImage | DecoderFault]:
        """One entry per input: the RGB image, the reason it is not an image (permanent),
        or the decoder fault it caused (retry)."""
        out: list[np.ndarray | InvalidImage | DecoderFault | None] = [None] * len(datas)
        pending = self._run(list(range(len(datas))), datas, out)
        if pending:
            # Something crashed or hung the pool: find which image, one at a time, so the
            # others of the batch are not blamed for it.
            log.warning("decoder pool failed; decoding %d images one by one", len(pending))
            for i in pending:
                if self._run([i], datas, out):
                    out[i] = DecoderFault(
                        f"the image decoder crashed or took longer than {self.timeout_s:g}s "
                        "on this image"
                    )
        return [r for r in out if r is not None]

    def _run(
        self,
        indices: list[int],
        datas: Sequence[bytes],
        out: list[np.ndarray | InvalidImage | DecoderFault | None],
    ) -> list[int]:
        """Decode ``indices`` into ``out``; return those the pool failed on."""
        try:
            pool = self._get_pool()
            futures: dict[Future[np.ndarray], int] = {
                pool.submit(self.decode, datas[i]): i for i in indices
            }
        except BrokenProcessPool:
            self._kill_pool()
            return indices
        started = time.monotonic()
        done, not_done = wait(futures, timeout=self.timeout_s, return_when=FIRST_EXCEPTION)
        # FIRST_EXCEPTION returns early on a plain InvalidImage too: wait for the rest.
        while not_done and not any(_broken(f) for f in done):
            remaining = self.timeout_s - (time.monotonic() - started)
            if remaining <= 0:
                break
            more, not_done = wait(not_done, timeout=remaining, return_when=FIRST_EXCEPTION)
            done |= more
        failed = [futures[f] for f in not_done]
        for future in done:
            i = futures[future]
            exc = future.exception()
            if exc is None:
                out[i] = future.result()
            elif isinstance(exc, InvalidImage):
                out[i] = exc
            elif isinstance(exc, BrokenProcessPool):
                failed.append(i)
            else:  # the decoder refused the bytes (cv2.error, ...): not an image we can read
                out[i] = InvalidImage(f"the image could not be decoded: {exc}")
        if failed:
            self._kill_pool()
        return sorted(failed)


def _die_with_parent(parent: int) -> None:
    """In each decoder process: a worker killed with SIGKILL cannot stop its children, so
    ask Linux to kill them with it (elsewhere they exit at their next read of the pool)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before prctl ran.
        if os.getppid() != parent:
            os._exit(1)


PR_SET_PDEATHSIG = 1


def _broken(future: Future[np.ndarray]) -> bool:
    return isinstance(future.exception(), BrokenProcessPool)
