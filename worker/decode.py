"""Image decoding for the models: OpenCV, the decoder ultralytics itself uses for files,
so the PyTorch YOLO backend sees exactly the pixels it would from a path. Models get RGB."""

from __future__ import annotations

import cv2
import numpy as np

from common.exceptions import InvalidImage


def decode_rgb(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise InvalidImage("the image could not be decoded (corrupt or truncated file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
