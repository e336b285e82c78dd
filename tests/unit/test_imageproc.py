"""Our torch-free preprocessing (decode, resize the shortest edge, centre-crop, normalise) against transformers'
own ``CLIPImageProcessor`` on the same images: a model trained or scored with ours sees what transformers
users feed it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.clip import build_clip
from models.imageproc import resize_center_crop

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _image(w: int, h: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth content (a gradient plus a few blocks), as photos are: resampling filters agree on it.
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / max(1, w - 1), y * 255 / max(1, h - 1), (x + y) * 127 / max(1, w + h - 2)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(1, w - 8)), rng.integers(0, max(1, h - 8))
        rgb[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 256, 3)
    img = Image.fromarray(rgb.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("w", "h", "size", "mode"),
    [
        (64, 64, 32, "RGB"),
        (100, 60, 32, "RGB"),
        (45, 130, 64, "RGB"),
        (256, 256, 224, "RGB"),
        (80, 50, 32, "L"),
    ],
)
def test_pixels_match_transformers_clip_image_processor(w, h, size, mode):
    try:  # transformers 5: the PIL backend, the one vlforge loads (models.clip._load_processor)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    data = _image(w, h, seed=w * h, mode=mode)
    reference = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=MEAN,
        image_std=STD,
    )
    expected = reference(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")[
        "pixel_values"
    ]

    pixels = resize_center_crop(data, size)
    assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
    bundle = build_clip("clip-tiny", ["a photo"])
    bundle.image_processor.image_mean, bundle.image_processor.image_std = list(MEAN), list(STD)
    ours = bundle.normalize_pixels(torch.from_numpy(pixels[None].copy()))
    assert ours.shape == expected.shape
    # Both resize with PIL's bicubic filter on uint8 and crop the same window; what differs is rounding, at
    # most a grey level or two on a few pixels (1/255/std ~ 0.015 after normalisation).
    diff = (ours - expected).abs()
    assert float(diff.mean()) < 0.01, float(diff.mean())
    assert float(diff.max()) < 0.1, float(diff.max())
