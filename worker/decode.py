"""Image decoding for the models, isolated from the worker.

OpenCV decodes (the decoder ultralytics itself uses for files, so the PyTorch YOLO backend
sees exactly the pixels it would from a path); models get RGB. The commonest upload, an
8-bit RGB or RGBA PNG, goes to imagecodecs' libpng instead: lossless, so the same pixels
(tests/unit/test_decode.py), for a quarter less CPU than OpenCV's PNG path. A hostile or
broken file can crash or hang a C decoder, so decoding runs in child processes with a
time bound: the worker survives either, and the job is retried, then failed.

Each child has a pipe for small messages and a shared-memory arena: the worker writes the
encoded bytes there and the child writes the decoded pixels back over them, so an image
crosses between processes as two memory copies, not as pickles pushed through a pipe
(which on a busy machine costs a context switch per 64 KiB). An image larger than the
arena travels through the pipe instead. One image at a time per child: a crash or a
hang names its image."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import cv2
import imagecodecs
import numpy as np

from hepato.common.exceptions import InvalidImage

log = logging.getLogger(__name__)

Decode = Callable[[bytes], np.ndarray]


class DecoderFault(Exception):
    """The decoder process crashed or ran out of time on this image (worth a retry: the
    cause may be the machine, not the file)."""


def decode_rgb(data: bytes) -> np.ndarray:
    fast = _png_rgb8(data)
    if fast is not None:
        return fast
    # Decoded straight to RGB: the pixels IMREAD_COLOR then cvtColor gave, for less CPU
    # (cvtColor's copy ran on OpenCV's thread pool: twice a JPEG's decoding CPU).
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    if image is None or image.size == 0:
        raise InvalidImage("the image could not be decoded (corrupt or truncated file)")
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR's bit depth and colour type, at these offsets of any PNG that starts right.
_PNG_DEPTH, _PNG_COLOUR = 24, 25
_RGB, _RGBA = 2, 6


def _png_rgb8(data: bytes) -> np.ndarray | None:
    """An 8-bit RGB or RGBA PNG's pixels (alpha dropped, as IMREAD_COLOR does, with no
    compositing), or None for OpenCV to decode: every other PNG (grey, palette, 16-bit,
    whose conversions are OpenCV's own) and one libpng refuses, so that a broken file
    gets OpenCV's answer as before."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    if data[_PNG_DEPTH] != 8 or data[_PNG_COLOUR] not in (_RGB, _RGBA):
        return None
    try:
        image = imagecodecs.png_decode(data)
    except imagecodecs.PngError:
        return None
    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[2] not in (3, 4):
        return None  # not what the header promised: OpenCV decides
    return np.ascontiguousarray(image[..., :3])


Outcome = np.ndarray | InvalidImage | DecoderFault


@dataclass
class _Child:
    """One decoder process: its pipe, its arena, and the image it is on (index, sent at)."""

    process: BaseProcess
    conn: Connection
    arena: SharedMemory | None
    busy: tuple[int, float] | None = None

    def send(self, index: int, data: bytes) -> None:
        if self.arena is not None and len(data) <= self.arena.size:
            _view(self.arena)[: len(data)] = data
            self.conn.send(len(data))
        else:
            self.conn.send(data)
        self.busy = (index, time.monotonic())

    def receive(self) -> np.ndarray | InvalidImage:
        kind, *rest = self.conn.recv()
        self.busy = None
        if kind == "arena":
            assert self.arena is not None
            shape, dtype = rest
            return np.ndarray(shape, np.dtype(dtype), buffer=_view(self.arena)).copy()
        if kind == "array":
            return rest[0]
        return InvalidImage(rest[0])

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()
        if self.arena is not None:
            self.arena.close()
            self.arena.unlink()


@dataclass
class IsolatedDecoder:
    """Decodes a microbatch in child processes. ``decode`` must be importable by name (it
    runs in a spawned process). ``arena_bytes``: each child's shared memory (0: none,
    everything through its pipe)."""

    processes: int
    timeout_s: float
    decode: Decode = decode_rgb
    arena_bytes: int = 16 * 2**20
    _children: list[_Child] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def warm(self) -> None:
        """Start the child processes now rather than on the first batch."""
        self.decode_all([cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1].tobytes()])

    def close(self) -> None:
        with self._lock:
            for child in self._children:
                child.kill()
            self._children.clear()

    def decode_all(self, datas: Sequence[bytes]) -> list[Outcome]:
        """One entry per input: the RGB image, the reason it is not an image (permanent),
        or the decoder fault it caused (retry)."""
        out: list[Outcome | None] = [None] * len(datas)
        with self._lock:
            failed = self._run(list(range(len(datas))), datas, out)
            if failed:
                # A crash or a hang: that image again, alone, in a fresh process, so that
                # a fault of the machine rather than of the file does not fail its job.
                log.warning("decoder failed on %d images; trying each again", len(failed))
                for i in failed:
                    if self._run([i], datas, out):
                        out[i] = DecoderFault(
                            f"the image decoder crashed or took longer than {self.timeout_s:g}s "
                            "on this image"
                        )
        return [r if r is not None else _lost() for r in out]

    def _run(
        self, indices: list[int], datas: Sequence[bytes], out: list[Outcome | None]
    ) -> list[int]:
        """Decode ``indices`` into ``out`` within ``timeout_s``; return those that crashed
        their process or were not done in time (those never started included)."""
        waiting, failed = list(reversed(indices)), list[int]()
        deadline = time.monotonic() + self.timeout_s
        while True:
            # A child can die on its image after `wait` returned without it: its image
            # failed too, or it would be left with no outcome.
            failed += [i for i in self._start() if i >= 0]
            for child in self._children:
                if child.busy is None and waiting:
                    try:
                        child.send(waiting[-1], datas[waiting[-1]])
                    except OSError:  # it died idle: replaced at the next turn
                        self._drop(child)
                        break
                    waiting.pop()
            busy = [child for child in self._children if child.busy is not None]
            if not busy:
                return sorted(failed)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for child in busy:
                    failed.append(self._drop(child))
                return sorted(failed + waiting)
            ready = wait([child.conn for child in busy], timeout=remaining)
            for child in busy:
                if child.conn not in ready:
                    continue
                index = child.busy[0] if child.busy else -1
                try:
                    out[index] = child.receive()
                except (EOFError, OSError):  # it died on this image
                    failed.append(self._drop(child))

    def _drop(self, child: _Child) -> int:
        """Kill ``child`` and forget it; the index of the image it was on (-1: none)."""
        index = child.busy[0] if child.busy else -1
        child.kill()
        self._children.remove(child)
        return index

    def _start(self) -> list[int]:
        """As many live children as asked for; a dead one is replaced. Returns the indices
        of the images the dead ones were on (-1: idle)."""
        lost = [self._drop(c) for c in [c for c in self._children if not c.process.is_alive()]]
        ctx = multiprocessing.get_context("spawn")
        while len(self._children) < self.processes:
            arena = SharedMemory(create=True, size=self.arena_bytes) if self.arena_bytes else None
            ours, theirs = ctx.Pipe()
            # spawn, not fork: the worker has runtime threads (ONNX Runtime, torch) that a
            # forked child would inherit in an unknown state.
            process = ctx.Process(
                target=_serve,
                args=(theirs, arena.name if arena else None, self.decode, os.getpid()),
                daemon=True,
                name="hepato-decoder",
            )
            process.start()
            theirs.close()  # the child's end: its death is then EOF on ours
            self._children.append(_Child(process, ours, arena))
        return lost


def _lost() -> DecoderFault:
    # Every image gets an outcome by construction; should one not, its job is retried
    # rather than the microbatch's outcomes being misaligned with its jobs.
    log.error("the decoder gave no outcome for an image; retrying its job")
    return DecoderFault("the image decoder gave no outcome for this image")


def _serve(conn: Connection, arena_name: str | None, decode: Decode, parent: int) -> None:
    """A decoder process: one image at a time, until the worker's end of the pipe closes."""
    _die_with_parent(parent)
    # The worker runs one child per core: OpenCV's own thread pool in each would only
    # add the cost of handing work between threads.
    cv2.setNumThreads(1)
    # Registered with the worker's resource tracker once more (a set): the worker unlinks it.
    arena = SharedMemory(name=arena_name) if arena_name else None
    while True:
        try:
            message: Any = conn.recv()
        except EOFError:
            return
        data = (
            bytes(_view(arena)[:message])
            if arena is not None and isinstance(message, int)
            else message
        )
        try:
            image = np.ascontiguousarray(decode(data))
        except InvalidImage as exc:
            conn.send(("invalid", str(exc)))
            continue
        except Exception as exc:  # the decoder refused the bytes (cv2.error, ...)
            conn.send(("invalid", f"the image could not be decoded: {exc}"))
            continue
        if arena is not None and image.nbytes <= arena.size:
            np.ndarray(image.shape, image.dtype, buffer=_view(arena))[...] = image
            conn.send(("arena", image.shape, image.dtype.str))
        else:
            conn.send(("array", image))


def _die_with_parent(parent: int) -> None:
    """In each decoder process: a worker killed with SIGKILL cannot stop its children, so
    ask Linux to kill them with it (elsewhere they exit when the pipe closes)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before prctl ran.
        if os.getppid() != parent:
            os._exit(1)


PR_SET_PDEATHSIG = 1


def _view(arena: SharedMemory) -> memoryview:
    view = arena.buf
    assert view is not None  # None only once closed
    return view
