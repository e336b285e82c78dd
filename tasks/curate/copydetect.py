"""Copy detection against an eval set: is a pool image the same as, or a near copy of, an eval image?

A near copy is the eval image re-encoded (another JPEG quality, another format), rescaled, or with a border
cropped off (either image may be the cropped one). Embeddings of our small CLIPs cannot tell such a copy from
another image of the same class (on synthetic data every red circle embeds alike), so this is copy detection
proper, two steps:

1. **candidates**: the eval images whose 8x8 colour descriptor (``vlforge.imagehash.descriptor_of``) lies
   within :data:`CANDIDATE_RADIUS` of the pool image's (faiss, the :data:`CANDIDATES` nearest), plus any eval
   image with the very same phash;
2. **verification**: the pool image and a candidate compared pixel by pixel at 32x32 after aligning them: the
   crop box of the larger one that best matches the other is searched (coordinate descent over its four
   sides, at most :data:`MAX_CROP` of a side each), in both directions. A mean absolute difference (0-255)
   of at most :data:`MATCH_MAD` as they are, or :data:`CROP_MAD` after cropping, together with a
   correlation of their fine detail (:func:`detail_corr`) of at least :data:`MIN_DETAIL_CORR`, is a copy.
   Plain images (flat colours, :func:`texture` below :data:`PLAIN_TEXTURE`) must match far closer after a
   crop (:data:`PLAIN_CROP_MAD`, :data:`PLAIN_CROP_CORR`): a cropped plain drawing can equal another drawing.

The thresholds were tuned on generator seed 1 of ``bench/decontam.py`` and are reported there on seed 2
(BENCHMARKS.md, Decontamination). The eval side (:class:`EvalIndex`) is small (12 KB a row) and goes to every
Ray task once; pool rows are decoded where the task runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlforge.imagehash import CANON, descriptor_of

CANDIDATES = 4  # eval images verified per pool image, at most
CANDIDATE_RADIUS = 6.0  # squared L2 between descriptors (192 values in 0-1) of a candidate, at most
COMPARE = 32  # verification compares images at this size
MAX_CROP = 0.10  # the largest border (of a side) a copy may have lost
MATCH_MAD = 7.0  # mean absolute difference (0-255) of a copy compared as it is, at most (JPEG q20-60: 3-5.6)
CROP_MAD = 4.0  # ... of a copy found by cropping one image: stricter, since a crop can also align two
# different drawings of one plain synthetic shape (BENCHMARKS.md, Decontamination)
MIN_DETAIL_CORR = 0.38  # correlation of the two images' fine detail (image minus its 3x3 blur), at least:
# a copy keeps its original's noise, grain and edges where they were (JPEG and rescaled copies 0.41-1.0 on
# seed 1); another drawing of the same shape does not (at most 0.34 among candidates on seed 1)
# A plain image (flat colours: a drawing without noise) has no fine detail away from its edges to tell a cropped
# copy from another drawing of the same shape at another size and place: its crops must match far closer.
PLAIN_TEXTURE = 0.7  # mean fine detail (0-255) in the flat parts of an image below which it is plain
PLAIN_CROP_MAD = (
    1.2  # seed 1: cropped copies of plain drawings 0.7-1.8, other drawings aligned by a crop 1.1-4
)
PLAIN_CROP_CORR = 0.85
_STEPS = (4.0, 2.0, 1.0, 0.5)  # coordinate-descent steps (pixels of the canonical image)


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


def _small(canon: np.ndarray, box=None) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(canon)
    return np.asarray(img.resize((COMPARE, COMPARE), Image.Resampling.BILINEAR, box=box), np.float32)


def _detail(x: np.ndarray) -> np.ndarray:
    """Grey [32, 32] minus its 3x3 box blur: noise, grain and edges."""
    g = x.mean(axis=2)
    p = np.pad(g, 1, mode="edge")
    blur = sum(p[i : i + COMPARE, j : j + COMPARE] for i in range(3) for j in range(3)) / 9.0
    return g - blur


def detail_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the fine detail of two aligned [32, 32, 3] float images (1: the same detail)."""
    da, db = _detail(a), _detail(b)
    da, db = da - da.mean(), db - db.mean()
    denom = float(np.sqrt((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 1e-9 else 1.0  # two flat images: nothing differs


def _aligned_mad(big: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """The least mean absolute difference between ``target`` (float [32, 32, 3]) and a crop of ``big``
    (uint8 canonical) whose sides each lose at most MAX_CROP, found by coordinate descent from no crop;
    and that crop (float [32, 32, 3])."""
    limit = MAX_CROP * CANON

    def mad(p: np.ndarray) -> float:
        box = (p[0], p[1], CANON - p[2], CANON - p[3])
        return float(np.abs(_small(big, box) - target).mean())

    best_p = np.zeros(4)
    best = mad(best_p)
    for step in _STEPS:
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
    return best, _small(big, (best_p[0], best_p[1], CANON - best_p[2], CANON - best_p[3]))


def copy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two canonical thumbnails are as copies, in units of the match threshold: the mean
    absolute difference (0-255) as they are over :data:`MATCH_MAD`, or after the best crop of either over
    :data:`CROP_MAD`, whichever is less. At most 1: a copy (0 for identical images)."""
    small_a, small_b = _small(a), _small(b)
    direct = _scored(float(np.abs(small_a - small_b).mean()) / MATCH_MAD, small_a, small_b)
    if direct <= 1.0:  # re-encoded or rescaled: no crop to look for
        return direct
    plain = min(texture(small_a), texture(small_b)) < PLAIN_TEXTURE
    limit, corr = (PLAIN_CROP_MAD, PLAIN_CROP_CORR) if plain else (CROP_MAD, MIN_DETAIL_CORR)
    mad_a, crop_a = _aligned_mad(a, small_b)
    mad_b, crop_b = _aligned_mad(b, small_a)
    return min(
        direct, _scored(mad_a / limit, crop_a, small_b, corr), _scored(mad_b / limit, crop_b, small_a, corr)
    )


def texture(x: np.ndarray) -> float:
    """Mean fine detail (0-255) of a [32, 32, 3] image where it is flat (no edge): noise, grain, texture."""
    g = x.mean(axis=2)
    gy, gx = np.gradient(g)
    flat = np.hypot(gx, gy) < 4.0
    return float(np.abs(_detail(x))[flat].mean()) if flat.any() else 0.0


def _scored(distance: float, x: np.ndarray, y: np.ndarray, min_corr: float = MIN_DETAIL_CORR) -> float:
    """``distance``, or above 1 (not a copy) when the two aligned images' fine detail does not correlate."""
    if distance > 1.0:
        return distance
    return distance if detail_corr(x, y) >= min_corr else 1.0 + distance


class CopyMatcher:
    """Matches pool thumbnails against an :class:`EvalIndex` (candidates, then verification)."""

    def __init__(self, index: EvalIndex):
        import faiss

        self.index = index
        self.knn = faiss.IndexFlatL2(3 * 64)
        if index.size:
            self.knn.add(np.ascontiguousarray(index.descriptors()))
        self.by_hash: dict[int, list[int]] = {}
        for i, h in enumerate(index.phash.tolist()):
            self.by_hash.setdefault(int(h), []).append(i)

    def match(
        self, phashes: list[int | None], canons: list[np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each pool row: the eval row it copies (-1: none) and the copy distance (NaN: none)."""
        n = len(canons)
        found, dist = np.full(n, -1, np.int64), np.full(n, np.nan)
        rows = [i for i, c in enumerate(canons) if c is not None]
        if not rows or self.index.size == 0:
            return found, dist
        desc = np.stack([descriptor_of(canons[i]) for i in rows])
        k = min(CANDIDATES, self.index.size)
        d2, near = self.knn.search(desc, k)
        for j, i in enumerate(rows):
            cands = [int(e) for e, d in zip(near[j], d2[j], strict=True) if e >= 0 and d <= CANDIDATE_RADIUS]
            cands = list(dict.fromkeys(self.by_hash.get(phashes[i], []) + cands))
            for e in cands:
                score = copy_distance(self.index.canon[e], canons[i])
                if score <= 1.0 and (found[i] < 0 or score < dist[i]):
                    found[i], dist[i] = e, score
        return found, dist
