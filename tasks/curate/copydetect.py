"""Copy detection against an eval set: is a pool image the same as, or a near copy of, an eval image?

A near copy is the eval image re-encoded (another JPEG quality, another format), rescaled, or with a border
cropped off (either image may be the cropped one), or all of these at once. Embeddings of our small CLIPs cannot
tell such a copy from another image of the same class (on synthetic data every red circle embeds alike), so
this is copy detection proper, two steps:

1. **candidates, with their crop geometry**: every eval image is indexed (faiss) by the 8x8 colour descriptor
   (``vlforge.imagehash.descriptor_of``) of itself and of :data:`VARIANT_CUTS` crops of it (every combination
   of those shares cut off each side), so a border-cropped pool image finds its original by one lookup of its
   own descriptor, with the crop already known to within half a step; the eval images within
   :data:`CANDIDATE_RADIUS` are candidates (at most :data:`CANDIDATES`), plus any with the very same phash. For
   the reverse case, a few central crops of the pool image (:data:`REVERSE_CUTS`) are looked up among the eval
   images as they are. The pool side costs a handful of descriptors a row; the eval side's lookup is a flat
   search up to ``copyindex.APPROX_FROM`` indexed crops, an inverted file of 8-bit codes above.
2. **verification**: the pool image and a candidate compared pixel by pixel at 32x32, as they are (a mean
   absolute difference, 0-255, of at most :data:`MATCH_MAD`) or at the candidate's crop, refined locally by
   coordinate descent over the four sides (at most :data:`MAX_CROP` of a side each; a pair further than
   :data:`GIVE_UP` apart at the looked-up crop is not refined), within :data:`CROP_MAD`. Either way their fine
   detail must correlate (:func:`detail_corr`, :data:`MIN_DETAIL_CORR`), and for a textured eval image (noise,
   grain: :func:`texture` at least :data:`PLAIN_TEXTURE`) also away from every edge, beyond chance
   (:func:`noise_z` at least :data:`NOISE_Z`, a z score). Outlines and the mean difference cannot tell a copy
   of a noisy drawing from another drawing of the same shape in nearly the same place, and the larger the eval
   set, the more such lookalikes it offers (the detector before this check removed 0.5% of distinct noisy
   drawings at 200 eval images, 8.5% at 2,000 and 31% at 20,000); independent noise does not correlate,
   however well the outlines line up, so the z score's chance level does not grow with the eval set. A copy
   shrunk and re-encoded keeps only the low band of its original's noise, which the fine detail (a 3x3
   high-pass) discards: the noise may instead correlate over every band (:func:`band_z`: each image less its
   mean over each edge-free region, the z score on the effective samples of such smooth noise, so chance stays
   N(0, 1)). A copy shrunk and re-encoded until even that band is gone is missed rather than such a lookalike
   removed (BENCHMARKS.md, Decontamination, "Shrunk copies"). A plain eval
   image (flat colours, :func:`texture` below :data:`PLAIN_TEXTURE`) has no such detail, and a cropped plain
   drawing can equal another drawing of the same shape at another size and place: its crops must match far
   closer (:data:`PLAIN_CROP_MAD`, :data:`PLAIN_CROP_CORR`), so some cropped copies of plain drawings are
   missed rather than other drawings removed.

Crops are resampled by two small matrix products (a triangle filter, as PIL resizes a box), so the refinement
costs microseconds a step. The thresholds were tuned on generator seed 1 of ``bench/decontam.py``
(:data:`NOISE_Z` on seed 1 of ``bench/decontam_lookup.py`` at 200, 2,000 and 20,000 eval images) and are
reported on seeds 2-4 (BENCHMARKS.md, Decontamination). The eval side (:class:`EvalIndex`, 12 KB a row) goes
to every Ray task once; each worker process builds the variant lookup from it once (:func:`_prepared`: exact
for a small eval set, approximate for a large one, ``tasks.curate.copyindex``) and pool rows are decoded where
the task runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from vlforge.imagehash import CANON, DESCRIPTOR, descriptor_of

CANDIDATES = 4  # eval images verified per pool image, at most
CANDIDATE_RADIUS = 6.0  # squared L2 between descriptors (192 values in 0-1) of a candidate, at most
COMPARE = 32  # verification compares images at this size
MAX_CROP = 0.10  # the largest border (of a side) a copy may have lost
MATCH_MAD = 7.0  # mean absolute difference (0-255) of a copy compared as it is, at most
# ... and the correlation of the two images' fine detail (image minus its 3x3 blur), at least: a copy keeps its
# original's noise, grain and edges where they were; another drawing of the shape does not
MIN_DETAIL_CORR = 0.38
CROP_MAD = 8.0  # a copy found by cropping: looser in difference (a crop that was also rescaled and re-encoded
CROP_CORR = 0.38  # loses sharpness)
# A textured eval image (noise, grain): the two images' noise away from every edge must correlate beyond
# chance, whichever way the pair was aligned: a z score of at least NOISE_Z in its fine band (:func:`noise_z`:
# the 3x3 high-pass, correlation x sqrt(pixels compared)) or over every band (:func:`band_z`: luma less each
# edge-free region's mean, the effective samples of smooth noise counted), the second for a copy shrunk and
# re-encoded, which keeps only the low band of its original's noise. Another drawing of the same shape in nearly
# the same place matches in outline and in mean difference (its independent noise alone differs by ~4.5 at 32
# px), and a large eval set offers one for most pool drawings; its noise does not correlate with the eval
# image's (band z ~ N(0, 1), white noise or smooth; fine z ~ N(0, 1) for white noise, narrower for smooth), a
# copy's does. Tuned on seed 1 (BENCHMARKS.md, Decontamination, "Shrunk copies": the band score alone at 3.0 /
# 3.25 / 3.5 found 0.82-0.78 / 0.81-0.77 / 0.80-0.75 of crop + rescale + JPEG copies of noisy drawings and
# removed 1.0 / 0.7 / 0.3% of distinct ones at 20,000 eval images; alone it also missed a few copies of smooth
# photo-like images, whose smooth residual has few effective samples, where the fine score counts every pixel).
NOISE_Z = 3.5
NOISE_MIN_PIXELS = 64  # fewer edge-free pixels than this: nothing to judge, the detail correlation decides
NOISE_LAGS = 3  # the noise's autocovariance is summed over lags up to this (px at 32 px) each way
# A plain eval image (flat colours: a drawing without noise) has no fine detail away from its edges to tell a
# cropped copy from another drawing of the same shape at another size and place: its crops must match far closer.
PLAIN_TEXTURE = 0.7  # mean fine detail (0-255) in the flat parts of an image below which it is plain
PLAIN_CROP_MAD = 1.2
PLAIN_CROP_CORR = 0.85
# Crop geometry. The eval side is indexed as it is and cropped: every combination of these shares of each side
# cut off, so a border-cropped pool image finds its original by descriptor lookup with the crop already known
# to within half a step; verification refines it locally instead of searching. The pool side stays one
# descriptor a row, plus a few central crops of it for the reverse case (the eval image is the cropped one).
VARIANT_CUTS = (0.0, 0.05, 0.10)
REVERSE_CUTS = (0.05, 0.10)
VARIANT_NEIGHBOURS = 24  # nearest indexed variants looked at per pool descriptor (several are one eval image)
GIVE_UP = 24.0  # a candidate whose mean difference at its variant's crop exceeds this is not refined
_REFINE_STEPS = (2.0, 1.0, 0.5)  # coordinate-descent steps from a known crop (canonical px)
_SEARCH_STEPS = (4.0, 2.0, 1.0, 0.5)  # ... from no crop (copy_distance, no geometry known)


@dataclass
class EvalIndex:
    """The eval images of one or more eval-set versions, as copy detection needs them."""

    refs: list[str]  # NAME@VERSION of each row's eval set
    keys: list[str]  # each row's key in its eval set
    phash: np.ndarray  # int64 [E]
    canon: np.ndarray  # uint8 [E, CANON, CANON, 3]

    @property
    def size(self) -> int:
        return len(self.keys)

    def descriptors(self) -> np.ndarray:
        if self.size == 0:
            return np.zeros((0, 3 * 64), np.float32)
        return np.stack([descriptor_of(c) for c in self.canon])

    def label(self, i: int) -> str:
        return f"{self.refs[i]} key {self.keys[i]}"


@functools.lru_cache(maxsize=8192)
def _weights(lo: float, hi: float, size: int = COMPARE) -> np.ndarray:
    """float32 [size, CANON]: resampling [lo, hi) of a CANON-px axis to ``size`` px with a triangle filter
    widened by the scale (antialiased bilinear, as PIL resizes with a box)."""
    scale = (hi - lo) / size
    support = max(scale, 1.0)
    centre = lo + (np.arange(size) + 0.5) * scale
    x = (np.arange(CANON) + 0.5)[None, :]
    w = np.clip(1.0 - np.abs(x - centre[:, None]) / support, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _rows(img: np.ndarray, top: float, bottom: float) -> np.ndarray:
    """float [COMPARE * 3, CANON]: ``img`` (float [CANON, CANON, 3]) resampled down its rows with ``top`` and
    ``bottom`` px cut off, laid out (row, channel) x column for the column pass."""
    w = _weights(round(float(top), 4), round(CANON - float(bottom), 4))
    out = w @ img.reshape(CANON, -1)  # [COMPARE, CANON * 3]
    return out.reshape(COMPARE, CANON, 3).transpose(0, 2, 1).reshape(COMPARE * 3, CANON)


def _cols(rows: np.ndarray, left: float, right: float) -> np.ndarray:
    w = _weights(round(float(left), 4), round(CANON - float(right), 4))
    return (rows @ w.T).reshape(COMPARE, 3, COMPARE).transpose(0, 2, 1)


def _small(canon: np.ndarray, cut=None) -> np.ndarray:
    """float32 [COMPARE, COMPARE, 3]: a canonical thumbnail (uint8 or float), ``cut`` (left, top, right,
    bottom px; None: nothing) cut off, at the comparison size."""
    c = np.zeros(4) if cut is None else cut
    return _cols(_rows(np.asarray(canon, np.float32), c[1], c[3]), c[0], c[2])


def _detail(x: np.ndarray) -> np.ndarray:
    """Grey [32, 32] minus its 3x3 box blur: noise, grain and edges."""
    g = x.mean(axis=2)
    p = np.pad(g, 1, mode="edge")
    blur = sum(p[i : i + COMPARE, j : j + COMPARE] for i in range(3) for j in range(3)) / 9.0
    return g - blur


def _flat(x: np.ndarray) -> np.ndarray:
    """bool [32, 32]: where a [32, 32, 3] image has no edge."""
    gy, gx = np.gradient(x.mean(axis=2))
    return np.hypot(gx, gy) < 4.0


def _near_edge(x: np.ndarray) -> np.ndarray:
    """bool [32, 32]: an edge of a [32, 32, 3] image at a pixel or one of its 8 neighbours (where the 3x3
    high-pass of :func:`_detail` still carries some of the edge)."""
    p = np.pad(~_flat(x), 1)
    return np.logical_or.reduce([p[i : i + COMPARE, j : j + COMPARE] for i in range(3) for j in range(3)])


def _edge_free(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [32, 32]: at least one pixel away from either image's edges (what the noise checks compare)."""
    return ~(_near_edge(a) | _near_edge(b))


def noise_z(a: np.ndarray, b: np.ndarray, details=None, where=None) -> float | None:
    """How far beyond chance the fine detail (noise, grain) of two aligned [32, 32, 3] float images correlates
    at least one pixel away from either image's edges: the correlation times the square root of the pixels
    compared (about N(0, 1) for independent noise, however alike the two outlines are); None where fewer than
    :data:`NOISE_MIN_PIXELS` such pixels are left. ``details``: their :func:`_detail`, ``where``: their
    :func:`_edge_free`, if already made."""
    where = _edge_free(a, b) if where is None else where
    n = int(where.sum())
    if n < NOISE_MIN_PIXELS:
        return None
    da, db = details if details is not None else (_detail(a), _detail(b))
    return _corr(da[where], db[where], 0.0) * np.sqrt(n)


_NOISE_GREY = np.array([0.299, 0.587, 0.114])  # JPEG's luma: the channel a re-encoded copy keeps sharpest


def band_z(a: np.ndarray, b: np.ndarray, where=None) -> float | None:
    """As :func:`noise_z`, over every band of the noise, not the fine one only: a copy shrunk and re-encoded
    keeps the low band of its original's noise, which the 3x3 high-pass discards (None likewise).

    The noise is each image's luma less its mean over each edge-free region (a connected part of the pixels
    compared: the drawing's flat colours, not a local blur), so it keeps every band, the low one a shrunk or
    re-encoded copy still carries as well as the fine one. Such noise is smooth, so the pixels are not
    independent samples: the z score divides the sum of the products by the square root of its variance were the
    two independent, sum over lags l of A_a(l) A_b(l) / N(l) (A: each side's autocovariance sums over the
    pixels compared, N: how many pairs of them lie l apart; lags up to :data:`NOISE_LAGS` px each way), which
    is correlation x sqrt(pixels) for white noise and counts fewer effective samples for smooth noise."""
    where = _edge_free(a, b) if where is None else where
    if int(where.sum()) < NOISE_MIN_PIXELS:
        return None
    from scipy import ndimage

    labels, k = ndimage.label(where)
    inside = labels[where]
    count = np.maximum(np.bincount(inside, minlength=k + 1), 1)

    def residual(x: np.ndarray) -> np.ndarray:
        g = x.astype(np.float64) @ _NOISE_GREY
        means = np.bincount(inside, weights=g[where], minlength=k + 1) / count
        return np.where(where, g - means[labels], 0.0)

    ra, rb = residual(a), residual(b)
    # autocovariance sums by FFT, the three at once; padded by more than NOISE_LAGS, so no lag wraps round
    size = COMPARE + NOISE_LAGS + 1
    f = np.fft.rfft2(np.stack([ra, rb, where.astype(np.float64)]), s=(size, size))
    auto = np.fft.irfft2(f * np.conj(f), s=(size, size))
    lags = np.r_[0 : NOISE_LAGS + 1, size - NOISE_LAGS : size]
    auto_a, auto_b, pairs = auto[:, lags][:, :, lags]
    var = float((auto_a * auto_b / np.maximum(np.round(pairs), 1.0)).sum())
    return float((ra * rb).sum()) / np.sqrt(var) if var > 1e-9 else 0.0  # a side without noise: no evidence


def detail_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the fine detail of two aligned [32, 32, 3] float images (1: the same detail)."""
    return _corr(_detail(a), _detail(b), 1.0)  # two flat images: nothing differs


def _corr(da: np.ndarray, db: np.ndarray, flat: float) -> float:
    """Pearson correlation of two arrays; ``flat`` where either does not vary."""
    da, db = da - da.mean(), db - db.mean()
    denom = float(np.sqrt((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 1e-9 else flat


def _aligned_mad(
    big: np.ndarray, target: np.ndarray, start: np.ndarray, steps: tuple[float, ...], give_up: float
) -> tuple[float, np.ndarray | None]:
    """The least mean absolute difference between ``target`` (float [32, 32, 3]) and a crop of ``big``
    (float canonical) whose sides each lose at most MAX_CROP, found by coordinate descent from the crop
    ``start`` (left, top, right, bottom px cut off); and that crop (float [32, 32, 3]). A start farther than
    ``give_up`` is not refined (None): the candidate came with its crop geometry, so a pair that far apart
    there is another image."""
    limit = MAX_CROP * CANON
    big = np.asarray(big, np.float32)
    rows_cache: dict[tuple[float, float], np.ndarray] = {}

    def crop(p: np.ndarray) -> np.ndarray:
        key = (float(p[1]), float(p[3]))
        if key not in rows_cache:
            rows_cache[key] = _rows(big, p[1], p[3])
        return _cols(rows_cache[key], p[0], p[2])

    def mad(p: np.ndarray) -> float:
        return float(np.abs(crop(p) - target).mean())

    best_p = np.clip(np.asarray(start, np.float64), 0.0, limit)
    best = mad(best_p)
    if best > give_up:
        return best, None
    for step in steps:
        improved = True
        while improved and best > 0:
            improved = False
            for side in range(4):
                for sign in (1.0, -1.0):
                    p = best_p.copy()
                    p[side] = min(max(p[side] + sign * step, 0.0), limit)
                    if p[side] == best_p[side]:
                        continue
                    value = mad(p)
                    if value < best:
                        best, best_p, improved = value, p, True
    return best, crop(best_p)


def textured(eval_texture: float) -> bool:
    """Whether an eval image of this :func:`texture` has the noise or grain that :func:`noise_z` judges."""
    return eval_texture >= PLAIN_TEXTURE


def crop_rule(eval_texture: float) -> tuple[float, float, bool]:
    """The (mean difference, detail correlation, noise check) a crop must reach, by the eval image's
    :func:`texture`: far closer for a plain eval image (see the module docstring). The eval image decides
    because its detail is what a distinct pool image cannot reproduce; a copy may have lost its detail to
    re-encoding."""
    if not textured(eval_texture):
        return PLAIN_CROP_MAD, PLAIN_CROP_CORR, False
    return CROP_MAD, CROP_CORR, True


def direct_distance(small_a: np.ndarray, small_b: np.ndarray, noise: bool = True) -> float:
    """Copy distance of two [32, 32, 3] float images compared as they are (re-encoded or rescaled copies);
    ``noise``: the eval image is :func:`textured`, so their noise must correlate too (:func:`noise_z`)."""
    mad = float(np.abs(small_a - small_b).mean())
    return _scored(mad / MATCH_MAD, small_a, small_b, MIN_DETAIL_CORR, noise)


def crop_distance(
    big: np.ndarray, small_other: np.ndarray, start, rule: tuple[float, float, float], search: bool = False
) -> float:
    """Copy distance of ``small_other`` (float [32, 32, 3]) as a border-cropped copy of ``big`` (canonical),
    under ``rule`` (:func:`crop_rule`), aligned from the crop ``start`` (px cut off each side) by a short
    local refinement, or by a full search from no crop (``search``: for a pair without known geometry)."""
    limit, corr, noise = rule
    steps = _SEARCH_STEPS if search else _REFINE_STEPS
    mad, crop = _aligned_mad(big, small_other, start, steps, np.inf if search else GIVE_UP)
    if crop is None:
        return 1.0 + mad / limit
    return _scored(mad / limit, crop, small_other, corr, noise)


def copy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two canonical thumbnails are as copies, in units of the match threshold, without a
    known crop geometry (full search, both ways): at most 1 is a copy (0 for identical images).
    :class:`CopyMatcher` does the same from the geometry its candidates come with, far cheaper."""
    small_a, small_b = _small(a), _small(b)
    rough = min(texture(small_a), texture(small_b))
    direct = direct_distance(small_a, small_b, textured(rough))
    if direct <= 1.0:
        return direct
    zero, rule = np.zeros(4), crop_rule(rough)
    return min(
        direct, crop_distance(a, small_b, zero, rule, True), crop_distance(b, small_a, zero, rule, True)
    )


def texture(x: np.ndarray) -> float:
    """Mean fine detail (0-255) of a [32, 32, 3] image where it is flat (no edge): noise, grain, texture."""
    flat = _flat(x)
    return float(np.abs(_detail(x))[flat].mean()) if flat.any() else 0.0


def _scored(
    distance: float, x: np.ndarray, y: np.ndarray, min_corr: float = MIN_DETAIL_CORR, noise: bool = False
) -> float:
    """``distance``, or above 1 (not a copy) when the two aligned images' fine detail does not correlate
    (at least ``min_corr`` in all; with ``noise``, also beyond chance away from the edges: :func:`noise_z` or
    :func:`band_z` at least :data:`NOISE_Z` where there are enough such pixels to judge)."""
    if distance > 1.0:
        return distance
    details = _detail(x), _detail(y)
    if _corr(*details, 1.0) < min_corr:
        return 1.0 + distance
    if not noise:
        return distance
    where = _edge_free(x, y)
    if (z := noise_z(x, y, details, where)) is not None and z < NOISE_Z and band_z(x, y, where) < NOISE_Z:
        return 1.0 + distance
    return distance


def _cuts(shares: tuple[float, ...]) -> np.ndarray:
    """float [K, 4]: every combination of ``shares`` cut off each side, in canonical px."""
    grid = np.array(np.meshgrid(*[shares] * 4, indexing="ij")).reshape(4, -1).T
    return grid * CANON


def _descriptor(canon: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """The 8x8 colour descriptor (as ``descriptor_of``) of a canonical thumbnail with ``cut`` px cut off."""
    if not cut.any():
        return descriptor_of(canon)
    d = DESCRIPTOR
    wy = _weights(round(float(cut[1]), 4), round(CANON - float(cut[3]), 4), d)
    wx = _weights(round(float(cut[0]), 4), round(CANON - float(cut[2]), 4), d)
    rows = (wy @ np.asarray(canon, np.float32).reshape(CANON, -1)).reshape(d, CANON, 3)
    return (np.einsum("lk,ikc->ilc", wx, rows).reshape(-1) / 255.0).astype(np.float32)


def _variant_descriptors(canon: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """float32 [E * K, 192]: the descriptor (as :func:`_descriptor`) of each of E canonical thumbnails (uint8
    [E, CANON, CANON, 3]) cut by each of the K ``cuts``, row e * K + k; one matrix product per crop for all E."""
    e, d = len(canon), DESCRIPTOR
    x = np.asarray(canon, np.float32).reshape(e, CANON, CANON * 3)
    out = np.empty((e, len(cuts), d, d, 3), np.float32)
    by_rows: dict[tuple[float, float], np.ndarray] = {}  # [E, d, CANON, 3]: the row pass of a (top, bottom)
    for k, cut in enumerate(cuts):
        if not cut.any():
            f = CANON // d
            out[:, k] = x.reshape(e, d, f, d, f, 3).mean(axis=(2, 4)) / 255.0
            continue
        key = (round(float(cut[1]), 4), round(CANON - float(cut[3]), 4))
        if key not in by_rows:
            by_rows[key] = np.matmul(_weights(*key, d), x).reshape(e, d, CANON, 3)
        wx = _weights(round(float(cut[0]), 4), round(CANON - float(cut[2]), 4), d)
        out[:, k] = np.einsum("lx,eyxc->eylc", wx, by_rows[key]) / 255.0
    return out.reshape(-1, 3 * d * d)


_CHUNK = 256  # eval images whose variant descriptors are computed at once (20 MB of float32)


class _Prepared:
    """What matching needs of an eval index, built once per process (a task may see the same index often):
    the variant and as-is lookups (``copyindex``: exact, or approximate for a large eval set) and each eval
    image's texture. Comparison thumbnails are made from ``canon`` when a candidate needs one (12 KB an
    eval image less per process)."""

    def __init__(self, index: EvalIndex, approximate: bool | None = None):
        from tasks.curate.copyindex import build_lookup

        self.cuts = _cuts(VARIANT_CUTS)
        self.reverse_cuts = np.array([[c * CANON] * 4 for c in REVERSE_CUTS])
        self.texture = [texture(_small(c)) for c in index.canon]
        canon = index.canon

        def variants(rows: np.ndarray | None):
            rows = np.arange(index.size) if rows is None else rows
            for i in range(0, len(rows), _CHUNK):
                yield _variant_descriptors(canon[rows[i : i + _CHUNK]], self.cuts)

        def as_is(rows: np.ndarray | None):
            rows = np.arange(index.size) if rows is None else rows
            for i in range(0, len(rows), _CHUNK):
                yield np.stack([descriptor_of(c) for c in canon[rows[i : i + _CHUNK]]])

        # row e * K + k: eval image e cut by self.cuts[k]; plain: row e, eval image e as it is
        self.variants = build_lookup(index.size, len(self.cuts), variants, approximate)
        self.plain = build_lookup(index.size, 1, as_is, approximate)
        self.by_hash: dict[int, list[int]] = {}
        for i, h in enumerate(index.phash.tolist()):
            self.by_hash.setdefault(int(h), []).append(i)


_PREPARED: dict[tuple, _Prepared] = {}


def _prepared(index: EvalIndex, approximate: bool | None = None) -> _Prepared:
    import hashlib

    key = (hashlib.sha1(index.phash.tobytes() + index.canon.tobytes()).digest(), approximate)
    if key not in _PREPARED:
        _PREPARED.clear()  # one eval index at a time per process
        _PREPARED[key] = _Prepared(index, approximate)
    return _PREPARED[key]


class CopyMatcher:
    """Matches pool thumbnails against an :class:`EvalIndex`: candidates with their crop geometry from the
    variant lookup, then verification at that geometry. ``approximate``: the lookups exact (False) or
    approximate (True); None, by the eval set's size (``copyindex.APPROX_FROM``)."""

    def __init__(self, index: EvalIndex, approximate: bool | None = None):
        self.index = index
        self.prep = _prepared(index, approximate)

    def match(
        self, phashes: list[int | None], canons: list[np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each pool row: the eval row it copies (-1: none) and the copy distance (NaN: none)."""
        n = len(canons)
        found, dist = np.full(n, -1, np.int64), np.full(n, np.nan)
        rows = [i for i, c in enumerate(canons) if c is not None]
        if not rows or self.index.size == 0:
            return found, dist
        p = self.prep
        desc = np.stack([descriptor_of(canons[i]) for i in rows])
        d2, near = p.variants.search(desc, min(VARIANT_NEIGHBOURS, p.variants.ntotal))
        # as they are (re-encoded or rescaled copies); the reverse case: central crops of the pool image
        kr = min(CANDIDATES, p.plain.ntotal)
        as_is = p.plain.search(desc, kr)
        reverse = [
            p.plain.search(np.stack([_descriptor(canons[i], c) for i in rows]), kr) for c in p.reverse_cuts
        ]
        n_cuts, zero = len(p.cuts), np.zeros(4)
        for j, i in enumerate(rows):
            same = p.by_hash.get(phashes[i], [])
            near_as_is = [
                int(e)
                for e, d in zip(as_is[1][j], as_is[0][j], strict=True)
                if e >= 0 and d <= CANDIDATE_RADIUS
            ]
            direct = list(dict.fromkeys(same + near_as_is))
            forward: dict[int, np.ndarray] = {e: zero for e in same}
            for v, d in zip(near[j], d2[j], strict=True):
                if v >= 0 and d <= CANDIDATE_RADIUS and len(forward) < CANDIDATES:
                    forward.setdefault(int(v) // n_cuts, p.cuts[int(v) % n_cuts])
            backward: dict[int, np.ndarray] = {}
            for cut, (rd2, rnear) in zip(p.reverse_cuts, reverse, strict=True):
                for e, d in zip(rnear[j], rd2[j], strict=True):
                    if e >= 0 and d <= CANDIDATE_RADIUS:
                        backward.setdefault(int(e), cut)
            found[i], dist[i] = self._verify(canons[i], direct, forward, backward)
        return found, dist

    def _verify(
        self, canon: np.ndarray, direct: list[int], forward: dict, backward: dict
    ) -> tuple[int, float]:
        """The eval row a pool image copies and the copy distance, or (-1, NaN): the ``direct`` candidates
        compared as they are first (the closest such copy wins), else the others at their crop geometry,
        nearest first."""
        p = self.prep
        small = _small(canon)
        scores = [direct_distance(_small(self.index.canon[e]), small, textured(p.texture[e])) for e in direct]
        if scores and min(scores) <= 1.0:
            best = int(np.argmin(scores))
            return direct[best], scores[best]
        for e in dict.fromkeys([*forward, *backward]):
            rule = crop_rule(p.texture[e])
            if e in forward and (d := crop_distance(self.index.canon[e], small, forward[e], rule)) <= 1.0:
                return e, d
            if (
                e in backward
                and (d := crop_distance(canon, _small(self.index.canon[e]), backward[e], rule)) <= 1.0
            ):
                return e, d
        return -1, np.nan
