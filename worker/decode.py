"""Image decoding for the model. OpenCV, not Pillow, so the pixels are exactly those
ultralytics gets from a file path (it decodes with OpenCV too, to BGR)."""

from __future__ import annotations

import cv2
import numpy as np

from common.exceptions import InvalidImage


def decode_bgr(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise InvalidImage("the image could not be decoded (corrupt or truncated file)")
    return image
