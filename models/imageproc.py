"""Image preprocessing for CLIP without torch: decode, resize the shortest edge, centre-crop.

Kept torch-free so Ray Data decode tasks start fast (no torch/transformers import) and ship ``uint8`` pixels
(4x smaller than float32) to the scorer, which normalises them on its own device
(:meth:`models.clip.ClipBundle.normalize_pixels`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes | Image.Image) -> Image.Image:
    img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return img.convert("RGB")


def resize_center_crop(image: bytes | Image.Image, size: int) -> np.ndarray:
    """Decode, resize the shortest edge to ``size`` (bicubic) and centre-crop: uint8 array [S, S, 3]."""
    img = decode_image(image)
    w, h = img.size
    # The long edge as transformers computes it (truncated), so both crop the same window.
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
