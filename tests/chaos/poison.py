"""Poison inputs for the chaos tests: valid PNGs whose bytes or pixels tell a stand-in
decoder or model to crash or hang, as a hostile file could make a real one do."""

from __future__ import annotations

import io
import os
import signal
import threading
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from hepato.worker.decode import decode_rgb

CRASH, HANG = b"POISON-CRASH", b"POISON-HANG"
# Marker pixels at (0, 0) that the stand-in models react to.
RAISE_PIXEL, HANG_PIXEL, DEATH_PIXEL = (1, 2, 3), (3, 2, 1), (2, 1, 3)


def png(marker: bytes = b"", pixel: tuple[int, int, int] | None = None) -> bytes:
    image = Image.new("RGB", (64, 64), (200, 150, 180))
    if pixel:
        image.putpixel((0, 0), pixel)
    info = PngImagePlugin.PngInfo()
    if marker:
        info.add_text("Comment", marker.decode())
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info)
    return out.getvalue()


def decode_or_die(data: bytes) -> np.ndarray:
    """Runs in the decoder's child process (importable by name)."""
    if CRASH in data:
        os.kill(os.getpid(), signal.SIGSEGV)
    if HANG in data:
        threading.Event().wait(3600)
    return decode_rgb(data)


class PoisonedModel:
    """Wraps a real model: raises on one marker pixel, hangs on another."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.manifest = model.manifest

    def predict(self, images: list[np.ndarray]) -> Any:
        for image in images:
            if tuple(image[0, 0]) == RAISE_PIXEL:
                raise RuntimeError("poison pixel")
            if tuple(image[0, 0]) == HANG_PIXEL:
                threading.Event().wait(60)
        return self.model.predict(images)
