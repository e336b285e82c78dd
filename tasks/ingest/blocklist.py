"""A blocklist of PDQ hashes (Meta's perceptual hash, the format hash-sharing programmes exchange): an image whose
hash lies within ``distance`` bits (Hamming, of 256) of a listed hash is refused where its bytes arrive, in the
download worker, before img2dataset writes anything; the row keeps its URL and the distance, never the bytes.

The file: one hash a line, 64 hex characters (optionally followed by ``,quality`` or other fields, as
ThreatExchange exports have), ``#`` comments. The driver parses it once into ``hashes-<sha256>.npy`` under the
storage root, which each worker process reads once (a Ray worker on another node reads it from the same storage).

Hashing cost: PDQ's own cost grows with the pixel count, so images are decoded reduced first: JPEG draft mode
decodes at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients (nearly free), other formats are thumbnailed.
PDQ downsamples to 64x64 internally, so a 256 px decode gives the same hash within a few bits.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import threading
from dataclasses import dataclass

import numpy as np

from vlforge import storage
from vlforge.errors import VlforgeError

BLOCKLISTED = "blocklisted"
HASH_SIDE = 256  # decode to at least this many pixels on the longer side before hashing
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class BlocklistRef:
    """What travels to the workers: where the parsed hashes are, and the threshold."""

    uri: str  # .npy of uint64[N, 4]
    digest: str  # sha256 of the source file
    size: int  # hashes
    distance: int


def parse_blocklist(path: str) -> tuple[np.ndarray, str]:
    """``(uint64[N, 4] hashes, sha256 of the file)``; one clear error names a missing file or a bad line."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise VlforgeError(f"--blocklist {path}: no such file") from None
    rows = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        first = re.split(r"[\s,;]+", line, maxsplit=1)[0]
        if not _HEX.match(first):
            raise VlforgeError(
                f"--blocklist {path} line {number}: {first[:80]!r} is not a PDQ hash (64 hex characters)"
            )
        rows.append(np.frombuffer(bytes.fromhex(first), dtype=">u8").astype(np.uint64))
    hashes = np.stack(rows) if rows else np.empty((0, 4), np.uint64)
    return hashes, hashlib.sha256(data).hexdigest()


def publish(path: str, root: str, distance: int) -> BlocklistRef:
    """Parse the blocklist at ``path`` and store its hashes under ``root`` (idempotent: named by digest)."""
    if not 0 <= distance <= 256:
        raise VlforgeError(f"--blocklist-distance must be between 0 and 256 bits, got {distance}")
    hashes, digest = parse_blocklist(path)
    uri = storage.join(root, f"hashes-{digest}.npy")
    if not storage.exists(uri):
        buf = io.BytesIO()
        np.save(buf, hashes)
        storage.write_bytes_atomic(uri, buf.getvalue())
    return BlocklistRef(uri, digest, int(len(hashes)), int(distance))


def pdq_hash(data: bytes) -> np.ndarray | None:
    """The PDQ hash of encoded image bytes as uint64[4] (big-endian words of the 64-hex form), or None when
    the bytes do not decode."""
    import pdqhash

    try:
        pixels = _reduced_rgb(data)
    except Exception:
        return None
    if pixels is None:
        return None
    # pdqhash.compute builds its bit vector in a 256-step Python loop; compute_float gives the same 16x16 DCT
    # output, and PDQ's bit k is "coefficient k > the lower median" (torben's median of 256 values).
    values, _quality = pdqhash.compute_float(pixels)
    bits = values > np.partition(values, 127)[127]
    return np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8").astype(np.uint64)


# Up to about 150x150 decoded pixels OpenCV's decode costs less (PIL's per-image overhead is ~0.1 ms here);
# past it PIL's decode is faster per pixel. Both give the same pixels, so the choice is cost only.
_CV2_MAX_PIXELS = 150 * 150
_CV2_REDUCED = {1: 1, 2: 16, 4: 32, 8: 64}  # scale -> cv2.IMREAD_REDUCED_COLOR_<scale> - IMREAD_COLOR


def _reduced_rgb(data: bytes) -> np.ndarray | None:
    """The image's RGB pixels, decoded at a reduced scale: at least HASH_SIDE on each side where the image is
    (JPEG draft mode's rule), at most 2 * HASH_SIDE on the longer side. A plain 8-bit RGB or greyscale JPEG
    (nearly every photo; its frame header read here, not by PIL's parser) that is small at that scale is decoded
    by OpenCV at the scale PIL's draft mode would pick (the same libjpeg scaled IDCT, the same pixels;
    img2dataset has OpenCV loaded in the worker already): a fraction of PIL's per-image overhead, which is
    most of the cost for small images. Anything else takes PIL's path."""
    frame = _jpeg_frame(data)
    if frame is not None:
        width, height = frame
        scale = next((s for s in (8, 4, 2) if min(width // HASH_SIDE, height // HASH_SIDE) >= s), 1)
        shape = (-(-height // scale), -(-width // scale))
        if shape[0] * shape[1] <= _CV2_MAX_PIXELS:
            pixels = _cv2_decode(data, scale)
            if pixels is not None and pixels.shape[:2] == shape:
                return pixels
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (HASH_SIDE, HASH_SIDE))  # JPEG: decode at a reduced scale
        img = img.convert("RGB")
        if max(img.size) > 2 * HASH_SIDE:
            img.thumbnail((2 * HASH_SIDE, 2 * HASH_SIDE), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def _jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of an 8-bit JPEG with 1 or 3 components (PIL's modes L and RGB), from its frame
    header; None for anything else (another format, CMYK, 12-bit, a header cut short)."""
    if data[:2] != b"\xff\xd8":
        return None
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _SOF:
            if at + 10 > end:
                return None
            precision, height, width, components = (
                data[at + 4],
                *struct.unpack(">HH", data[at + 5 : at + 9]),
                data[at + 9],
            )
            ok = precision == 8 and components in (1, 3) and width and height
            return (width, height) if ok else None
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def _cv2_decode(data: bytes, scale: int) -> np.ndarray | None:
    """RGB pixels at 1/``scale``, EXIF orientation ignored (as PIL's decode does), or None (then PIL decodes:
    OpenCV's pixel limit, a codec it lacks)."""
    import cv2

    flags = cv2.IMREAD_COLOR | _CV2_REDUCED[scale] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    if bgr is None or bgr.ndim != 3:
        return None
    return np.ascontiguousarray(bgr[:, :, ::-1])


def hash_hex(hashed: np.ndarray) -> str:
    return hashed.astype(">u8").tobytes().hex()


def nearest(hashes: np.ndarray, hashed: np.ndarray) -> int:
    """Smallest Hamming distance from ``hashed`` (uint64[4]) to any row of ``hashes`` (uint64[N, 4])."""
    return _scan(hashes.T, hashed)


def _scan(words: np.ndarray, hashed: np.ndarray) -> int:
    """``nearest`` over the hashes as four word columns (uint64[4, N], contiguous for a listed scan): summing
    one column at a time into a small integer type avoids the (N, 4) temporaries and the wide row sums. 257 (more
    than any distance) when there are none."""
    if not words.shape[1]:
        return 257
    distance = np.bitwise_count(words[0] ^ hashed[0]).astype(np.uint16)
    for w in range(1, 4):
        distance += np.bitwise_count(words[w] ^ hashed[w])
    return int(distance.min())


class HashIndex:
    """Multi-index hashing (Norouzi et al.): the 256 bits cut into 16 chunks of 16; two hashes within ``d`` bits
    agree within ``d // 16`` bits on at least one chunk (pigeonhole), so only the rows sharing a near chunk are
    compared in full. For the default ``d`` of 31 that is 17 probes per chunk and, for a list of random-looking
    hashes, about one row in 240 compared, instead of all of them; a list of a million hashes stays a fraction
    of a millisecond per image (`bench/blocklist.py`). Past ``d`` = 47 (or for a short list) the probes cost more
    than they save, and the scan is the plain one.
    """

    CHUNKS = 16
    _INDEXED = 35_000  # below it the plain scan is faster (bench/blocklist.py, 2026-12-03)

    def __init__(self, hashes: np.ndarray, distance: int, indexed: bool | None = None):
        """``indexed``: None chooses by the list's size (a benchmark forces either way)."""
        self.hashes = hashes
        self.distance = distance
        radius = distance // self.CHUNKS
        wanted = len(hashes) >= self._INDEXED if indexed is None else indexed
        self.indexed = wanted and radius <= 2
        if not self.indexed:
            self._words = np.ascontiguousarray(hashes.T)  # the plain scan reads one word column at a time
            return
        # One sorted key per (chunk, value): chunk * 2**16 + value, so all probes are one searchsorted.
        self._offsets = np.arange(self.CHUNKS, dtype=np.uint32) << 16
        keys = (_chunks(hashes).astype(np.uint32) + self._offsets).ravel()
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]
        self._order //= self.CHUNKS  # position in the sorted keys -> row
        self._flips = _flip_masks(radius).astype(np.uint32)

    def nearest_within(self, hashed: np.ndarray) -> int | None:
        """The distance to the nearest listed hash when it is within ``distance``, else None."""
        if not self.indexed:
            best = _scan(self._words, hashed)
            return best if best <= self.distance else None
        query = _chunks(hashed[None])[0].astype(np.uint32)
        probes = (query[:, None] ^ self._flips[None, :]) + self._offsets[:, None]
        lo = np.searchsorted(self._keys, probes.ravel(), side="left")
        hi = np.searchsorted(self._keys, probes.ravel(), side="right")
        hit = lo < hi
        if not hit.any():
            return None
        lo, hi = lo[hit], hi[hit]
        # every position in [lo, hi) of each probe, without a Python loop
        sizes = hi - lo
        positions = np.repeat(lo - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())
        best = nearest(self.hashes[np.unique(self._order[positions])], hashed)
        return best if best <= self.distance else None


def _chunks(hashes: np.ndarray) -> np.ndarray:
    """uint64[N, 4] -> uint16[N, 16], most significant chunk first (any fixed order would do)."""
    return hashes.astype(">u8").view(">u2").astype(np.uint16).reshape(len(hashes), 16)


def _flip_masks(radius: int) -> np.ndarray:
    """Every 16-bit mask with at most ``radius`` bits set."""
    masks = np.arange(1 << 16, dtype=np.uint32)
    return masks[np.bitwise_count(masks) <= radius].astype(np.uint16)


_loaded: dict[tuple[str, int], HashIndex] = {}
_load_lock = threading.Lock()


def load(ref: BlocklistRef) -> HashIndex:
    """The index of ``ref``'s hashes, read and built once per process."""
    key = (ref.digest, ref.distance)
    with _load_lock:
        if key not in _loaded:
            _loaded[key] = HashIndex(np.load(io.BytesIO(storage.read_bytes(ref.uri))), ref.distance)
        return _loaded[key]


def match(ref: BlocklistRef, data: bytes) -> int | None:
    """The distance to the nearest listed hash when it is within the threshold, else None."""
    hashed = pdq_hash(data)
    if hashed is None:
        return None
    return load(ref).nearest_within(hashed)
