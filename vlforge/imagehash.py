"""Content fingerprints of an image: a perceptual hash, a coarse descriptor and a canonical thumbnail.

``phash``: the classic DCT perceptual hash, 64 bits: the image in grey at 32x32, its 2-D DCT, the 8x8
lowest-frequency coefficients each compared with their median. The bits are ordered from the lowest frequency
(``u + v`` small) to the highest, so the top bits are the most robust to re-encoding and rescaling: the held-out
split reads the top :data:`SPLIT_BITS` of them (:func:`split_hash`), so a copy falls on the same side as its
original (BENCHMARKS.md, Decontamination, measures how often). Stored signed (int64) as Parquet holds it.

``descriptor``: the image at 8x8 in colour (192 numbers, 0-1): the candidate search of copy detection
(``tasks.curate.copydetect``); ``canonical``: the image at :data:`CANON` px square in colour (uint8), which the
verification step crops and compares.
"""

from __future__ import annotations

import functools
import hashlib
import io

import numpy as np

HASH_SIZE = 32  # the grey image the DCT runs on
CANON = 64  # canonical thumbnail side (uint8 RGB) for verification
DESCRIPTOR = 8  # descriptor side: 8x8x3
SPLIT_BITS = 16  # the lowest-frequency bits of the phash that decide a row's side of the held-out split
SPLIT_RULE = f"phash{SPLIT_BITS}"  # recorded with every training run (tasks.train.data)


@functools.lru_cache(maxsize=1)
def _dct_matrix(n: int = HASH_SIZE) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


@functools.lru_cache(maxsize=1)
def _zigzag() -> np.ndarray:
    """The 64 (u, v) positions of the 8x8 low-frequency block, lowest frequency first (flat indices)."""
    cells = sorted((u + v, u, v) for u in range(8) for v in range(8))
    return np.array([u * 8 + v for _, u, v in cells])


def open_rgb(data: bytes):
    """Encoded bytes -> a PIL RGB image (raises on undecodable bytes)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (4 * CANON, 4 * CANON))  # JPEG: decode at reduced size, far cheaper for big photos
    return img.convert("RGB")


def phash_of(img) -> int:
    """The 64-bit DCT perceptual hash of a PIL image, as a signed int64 (see the module docstring)."""
    from PIL import Image

    grey = np.asarray(img.convert("L").resize((HASH_SIZE, HASH_SIZE), Image.Resampling.BOX), np.float64)
    d = _dct_matrix()
    coef = (d @ grey @ d.T)[:8, :8].reshape(-1)[_zigzag()]
    bits = coef[1:] > np.median(coef[1:])  # the DC term only says how bright the image is
    value = int("".join("1" if b else "0" for b in bits) + "0", 2)  # 63 bits + a zero lowest bit
    return value - (1 << 64) if value >= 1 << 63 else value


def canonical(img) -> np.ndarray:
    """uint8 [CANON, CANON, 3]: the image squashed to a square (copies keep the original's aspect or not)."""
    from PIL import Image

    return np.asarray(img.resize((CANON, CANON), Image.Resampling.BOX), np.uint8)


def descriptor_of(canon: np.ndarray) -> np.ndarray:
    """float32 [192]: the canonical thumbnail averaged down to 8x8 colour, in 0-1."""
    f = CANON // DESCRIPTOR
    small = canon.reshape(DESCRIPTOR, f, DESCRIPTOR, f, 3).mean(axis=(1, 3))
    return (small.reshape(-1) / 255.0).astype(np.float32)


def fingerprint(data: bytes) -> tuple[int, np.ndarray] | None:
    """(phash, canonical thumbnail) of encoded image bytes; None when they cannot be decoded."""
    try:
        img = open_rgb(data)
    except Exception:  # any undecodable image: PIL raises several types
        return None
    return phash_of(img), canonical(img)


def phash_bytes(data: bytes) -> int | None:
    """The phash of encoded image bytes; None when they cannot be decoded."""
    try:
        return phash_of(open_rgb(data))
    except Exception:  # any undecodable image: PIL raises several types
        return None


def split_hash(phash: int | None, fallback: str = "") -> int:
    """A uniform 32-bit number for the held-out split from the top :data:`SPLIT_BITS` of a phash (a row
    without one, e.g. undecodable, hashes ``fallback`` instead)."""
    if phash is None:
        payload = b"nohash:" + fallback.encode("utf-8")
    else:
        top = (int(phash) & ((1 << 64) - 1)) >> (64 - SPLIT_BITS)
        payload = b"phash:" + top.to_bytes(4, "big")
    return int.from_bytes(hashlib.sha1(payload).digest()[:4], "big")
