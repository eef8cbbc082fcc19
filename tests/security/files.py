"""Hostile files built byte by byte for the bad-input tests, and small helpers to post
them and measure what refusing them cost."""

from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
import psutil
from fastapi.testclient import TestClient
from PIL import Image
from starlette import testclient

from hepato.common.storage import ObjectStore

MiB = 1024 * 1024
# TestClient answers with httpx2's Response where that package happens to be installed
# (huggingface_hub brings it; no extra of ours declares it), else with httpx's: name
# whichever starlette chose rather than import a package the project does not declare.
Response = testclient.httpx.Response


# --- files -------------------------------------------------------------------------------


def encode(fmt: str, size: tuple[int, int] = (64, 48), **params: object) -> bytes:
    """Noise, so that a JPEG has real entropy-coded data to truncate."""
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **params)
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, before_idat: bytes = b"") -> bytes:
    """A PNG of a few bytes whose header declares width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + before_idat
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def tiff_declaring(width: int, height: int) -> bytes:
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    tags += [(273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", t, k, 1, v) for t, k, v in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


@cache
def zeros_deflated(n_bytes: int) -> bytes:
    return zlib.compress(bytes(n_bytes), 9)


def text_bomb(kind: bytes) -> bytes:
    """One metadata chunk that inflates to 32 MiB (Pillow's per-chunk cap is 1 MiB)."""
    head = {
        b"zTXt": b"Comment\x00\x00",
        b"iCCP": b"icc\x00\x00",
        b"iTXt": b"Comment\x00\x01\x00\x00\x00",
    }
    return png_declaring(64, 64, chunk(kind, head[kind] + zeros_deflated(32 * MiB)))


def many_text_chunks() -> bytes:
    """100 chunks each just under the per-chunk cap: 100 MB of text in 100 kB of file."""
    one = zeros_deflated(1_000_000)
    body = b"".join(chunk(b"zTXt", b"C%d\x00\x00" % i + one) for i in range(100))
    return png_declaring(64, 64, body)


def replace_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """The PNG with its first `kind` chunk's data replaced (the CRC recomputed)."""
    at = png.index(kind) - 4
    length = struct.unpack(">I", png[at : at + 4])[0]
    return png[:at] + chunk(kind, body) + png[at + 12 + length :]


def set_tiff_tag(tiff: bytes, tag: int, value: int) -> bytes:
    """Overwrite a SHORT tag of a little-endian TIFF's first IFD."""
    data = bytearray(tiff)
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == tag:
            data[entry + 8 : entry + 10] = struct.pack("<H", value)
            return bytes(data)
    raise AssertionError(f"no tag {tag}")


def garbled(data: bytes, marker: bytes, offset: int, junk: bytes) -> bytes:
    at = data.index(marker) + offset
    return data[:at] + junk + data[at + len(junk) :]


# --- helpers -----------------------------------------------------------------------------


def post_one(client: TestClient, name: str, data: bytes) -> Response:
    return client.post("/v1/jobs", files={"file": (name, data, "image/png")})


def post_batch(client: TestClient, files: list[tuple[str, bytes]]) -> Response:
    return client.post("/v1/batches", files=[("files", (n, d, "image/png")) for n, d in files])


@dataclass
class Cost:
    seconds: float = 0.0
    traced_peak: int = 0  # Python allocations, every thread (the app runs in another)
    rss_growth: int = 0  # the process's resident memory, sampled every 2 ms


@contextmanager
def measured() -> Iterator[Cost]:
    proc = psutil.Process()
    cost = Cost()
    base = peak = proc.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    sampler.start()
    started = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        cost.traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        cost.rss_growth = max(peak, proc.memory_info().rss) - base


def bucket_keys(store: ObjectStore) -> set[str]:
    return {o.object_name for o in store.client.list_objects(store.bucket, recursive=True)}
