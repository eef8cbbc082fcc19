"""The isolated decoder (worker.decode) with real child processes: the same pixels as
decoding in-process, through the shared arena or the pipe; a file that is not an image,
one that crashes its process and one that hangs it each get their own answer and leave
the others of the microbatch decoded, and the decoder keeps working after them."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from hepato.common.exceptions import InvalidImage
from hepato.worker import decode
from hepato.worker.decode import DecoderFault, IsolatedDecoder, decode_rgb
from tests.chaos import poison


def encoded(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes()


IMAGES = [encoded(320, 320, 1), encoded(64, 48, 2), encoded(700, 500, 3), encoded(31, 17, 4)]


@pytest.fixture
def decoder() -> Iterator[IsolatedDecoder]:
    made = IsolatedDecoder(2, 2.0, poison.decode_or_die)
    yield made
    made.close()


class Recorder:
    """A child's pipe that records what the worker sends through it."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.sent = conn, list[Any]()

    def send(self, message: Any) -> None:
        self.sent.append(message)
        self.conn.send(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


@pytest.mark.parametrize("arena_bytes", [16 * 2**20, 2**16, 0])
def test_pixels_equal_decoding_in_process(arena_bytes: int) -> None:
    """16 MiB: every image through the arena; 64 KiB: the largest through the pipe; 0: no
    arena."""
    decoder = IsolatedDecoder(2, 10.0, arena_bytes=arena_bytes)
    try:
        decoder.warm()
        recorders = [Recorder(child.conn) for child in decoder._children]
        for child, recorder in zip(decoder._children, recorders, strict=True):
            child.conn = recorder  # type: ignore[assignment]
        got = decoder.decode_all(IMAGES * 2)
    finally:
        decoder.close()
    for image, data in zip(got, IMAGES * 2, strict=True):
        assert isinstance(image, np.ndarray)
        np.testing.assert_array_equal(image, decode_rgb(data))
    sent = [m for recorder in recorders for m in recorder.sent]
    through_arena = [data for data in IMAGES * 2 if len(data) <= arena_bytes]
    assert sorted(m for m in sent if isinstance(m, int)) == sorted(map(len, through_arena))
    assert len(sent) == len(IMAGES) * 2


def test_a_file_that_is_not_an_image_is_named_and_the_others_decode(
    decoder: IsolatedDecoder,
) -> None:
    got = decoder.decode_all([IMAGES[0], b"not an image at all", IMAGES[1]])
    assert isinstance(got[0], np.ndarray) and isinstance(got[2], np.ndarray)
    assert isinstance(got[1], InvalidImage) and "could not be decoded" in str(got[1])


def test_a_crash_fails_its_image_alone_and_the_decoder_goes_on(
    decoder: IsolatedDecoder,
) -> None:
    batch = [IMAGES[0], poison.png(poison.CRASH), IMAGES[1], IMAGES[3]]
    got = decoder.decode_all(batch)
    assert isinstance(got[1], DecoderFault) and "crashed" in str(got[1])
    for i in (0, 2, 3):
        np.testing.assert_array_equal(got[i], decode_rgb(batch[i]))
    again = decoder.decode_all(IMAGES)
    assert all(isinstance(image, np.ndarray) for image in again)
    assert len(decoder._children) == 2


def test_a_crash_after_the_others_answered_still_fails_its_image(
    decoder: IsolatedDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash lands after ``wait`` returned with the other child's answer: the dead child
    is found when the decoder next looks at its processes. Once, its image was dropped
    there, and the microbatch's outcomes came back one short (CI: a crash in a batch of
    six failed all six). Here the child on the poison file hangs, so ``wait`` can only
    return the other's answer, and is killed right after."""
    decoder.warm()
    real_wait = decode.wait

    def wait_then_kill_the_hung(conns: Any, timeout: float | None = None) -> Any:
        ready = real_wait(conns, timeout)
        for child in decoder._children:
            if ready and child.busy is not None and child.conn not in ready:
                child.process.kill()
                child.process.join()
        return ready

    monkeypatch.setattr(decode, "wait", wait_then_kill_the_hung)
    batch = [IMAGES[1], poison.png(poison.HANG)]
    got = decoder.decode_all(batch)
    assert len(got) == 2
    np.testing.assert_array_equal(got[0], decode_rgb(batch[0]))
    assert isinstance(got[1], DecoderFault) and "crashed" in str(got[1])


def test_a_hang_is_cut_at_the_timeout_and_the_others_decode(decoder: IsolatedDecoder) -> None:
    batch = [poison.png(poison.HANG), IMAGES[0], IMAGES[1], IMAGES[2]]
    got = decoder.decode_all(batch)
    assert isinstance(got[0], DecoderFault) and "longer than 2s" in str(got[0])
    for i in (1, 2, 3):
        np.testing.assert_array_equal(got[i], decode_rgb(batch[i]))
    assert all(child.process.is_alive() for child in decoder._children)


def test_closing_stops_the_processes_and_frees_the_arenas(decoder: IsolatedDecoder) -> None:
    decoder.warm()
    children = list(decoder._children)
    names = [child.arena.name for child in children if child.arena]
    decoder.close()
    assert len(names) == 2 and not any(child.process.is_alive() for child in children)
    for name in names:
        with pytest.raises(FileNotFoundError):
            from multiprocessing.shared_memory import SharedMemory

            SharedMemory(name=name)


def _chunk_after_ihdr(png: bytes, kind: bytes, payload: bytes) -> bytes:
    """``png`` with one more chunk right after its IHDR (8 + 25 bytes in)."""
    chunk = struct.pack(">I", len(payload)) + kind + payload
    return png[:33] + chunk + struct.pack(">I", zlib.crc32(kind + payload)) + png[33:]


def _pillow_png(pixels: np.ndarray, mode: str, **options: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, "PNG", **options)
    return out.getvalue()


def _kinds() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    rgba = rng.integers(0, 255, (40, 56, 4), dtype=np.uint8)
    png = cv2.imencode(".png", rgb)[1].tobytes()
    return {
        "png": png,
        # 8-bit RGB(A) PNGs go to imagecodecs (decode._png_rgb8); whatever their chunks
        # say of gamma, colour profile or transparency, OpenCV ignores it and so must it.
        "png with varying alpha": _pillow_png(rgba, "RGBA"),
        "png with gAMA": _chunk_after_ihdr(png, b"gAMA", struct.pack(">I", 100000)),
        "png with sRGB": _chunk_after_ihdr(png, b"sRGB", b"\x00"),
        "png with sBIT": _chunk_after_ihdr(png, b"sBIT", b"\x05\x06\x05"),
        "png with tRNS": _pillow_png(rgb, "RGB", transparency=(1, 2, 3)),
        "png with an ICC profile": _pillow_png(rgb, "RGB", icc_profile=b"\x00" * 200),
        "palette png": _pillow_png(np.asarray(Image.fromarray(rgb).quantize(16)), "P"),
        "grey png": cv2.imencode(".png", rgb[..., 0])[1].tobytes(),
        "png with alpha": cv2.imencode(".png", np.dstack([rgb, rgb[..., :1]]))[1].tobytes(),
        "16-bit png": cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes(),
        "jpeg": cv2.imencode(".jpg", rgb)[1].tobytes(),
        "tiff": cv2.imencode(".tiff", rgb)[1].tobytes(),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_pixels_are_opencvs_colour_decoding_in_rgb_order(kind: str) -> None:
    """What the models were given before decoding went straight to RGB (and what
    ultralytics reads from a path): IMREAD_COLOR's pixels, BGR turned to RGB."""
    data = _kinds()[kind]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    got = decode_rgb(data)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def test_an_8_bit_rgb_png_is_decoded_without_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commonest upload takes the cheaper decoder; OpenCV is not called for it."""

    def no_opencv(*_: object) -> None:
        raise AssertionError("OpenCV decoded an 8-bit RGB PNG")

    monkeypatch.setattr(decode.cv2, "imdecode", no_opencv)
    for kind in ("png", "png with varying alpha"):
        assert decode_rgb(_kinds()[kind]).shape == (40, 56, 3)


@pytest.mark.parametrize("cut", [40, 200, -20])
def test_a_truncated_png_is_refused_as_before(cut: int) -> None:
    """A broken 8-bit RGB PNG gets OpenCV's answer: the same InvalidImage as before."""
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode_rgb(_kinds()["png"][:cut])
