"""``pdq_hash``'s fast path (a plain JPEG's frame header read by hand, a small one decoded by OpenCV at draft
scale, the bits taken from ``pdqhash.compute_float``) gives exactly the hash of PDQ's reference call on PIL's
draft-mode decode, for every kind of image it takes and every kind it leaves to PIL."""

from __future__ import annotations

import io

import numpy as np
import pdqhash
import pytest
from PIL import Image, ImageFilter

from tasks.ingest.blocklist import HASH_SIDE, _jpeg_frame, pdq_hash


def _reference(data: bytes) -> np.ndarray:
    """The hash as first built: PIL decodes at draft scale (thumbnailed past 2 * HASH_SIDE), pdqhash.compute."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (HASH_SIDE, HASH_SIDE))
        img = img.convert("RGB")
        if max(img.size) > 2 * HASH_SIDE:
            img.thumbnail((2 * HASH_SIDE, 2 * HASH_SIDE), Image.Resampling.BILINEAR)
        bits, _ = pdqhash.compute(np.asarray(img, dtype=np.uint8))
    return np.frombuffer(np.packbits(bits.astype(np.uint8)).tobytes(), ">u8").astype(np.uint64)


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))


def _encode(img: Image.Image, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, "PNG")
    elif kind == "grey":
        img.convert("L").save(buf, "JPEG", quality=85)
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=85)
    elif kind == "progressive":
        img.save(buf, "JPEG", quality=60, progressive=True)
    elif kind == "444":
        img.save(buf, "JPEG", quality=95, subsampling=0)
    elif kind == "rotated":  # EXIF orientation 6: both decodes ignore it
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    else:
        img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(64, 48), (120, 150), (255, 300), (300, 200), (1024, 768), (2600, 300)])
@pytest.mark.parametrize("kind", ["rgb", "grey", "progressive", "444", "rotated", "cmyk", "png"])
def test_the_fast_path_hashes_exactly_as_the_reference(kind, size):
    data = _encode(_photo(sum(size), size), kind)
    assert (_jpeg_frame(data) == size) == (kind not in ("cmyk", "png"))  # who takes the hand-read header
    hashed = pdq_hash(data)
    assert hashed is not None and np.array_equal(hashed, _reference(data))


def test_what_does_not_decode_has_no_hash():
    data = _encode(_photo(1, (64, 48)), "rgb")
    assert (
        pdq_hash(b"not an image") is None and pdq_hash(data[:40]) is None and _jpeg_frame(data[:12]) is None
    )
