"""Curation filters: small units ``keep(table, ...) -> (mask, reasons)``.

Each filter looks at a pyarrow table of candidate rows (raw metadata joined with CLIP scores) and returns a
boolean keep mask plus, for every dropped row, a :class:`Decision` (reason, the value that decided it and a
human-readable detail). :func:`apply_filters` runs them in order; a row is judged only by the first filter
that drops it, so every rejected row carries exactly one reason.

Defaults never drop ordinary images (see :class:`FilterConfig` for where each comes from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, model_validator

from vlforge.errors import VlforgeError

# Reasons, in the order the filters run.
DOWNLOAD_FAILED = "download_failed"
DECODE_FAILED = "decode_failed"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
WRONG_LANGUAGE = "wrong_language"
LOW_CLIP_SCORE = "low_clip_score"
OUTSIDE_TOP_FRACTION = "outside_top_fraction"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
REASONS = (
    DOWNLOAD_FAILED,
    DECODE_FAILED,
    TOO_SMALL,
    BAD_ASPECT_RATIO,
    CAPTION_TOO_SHORT,
    CAPTION_TOO_LONG,
    WRONG_LANGUAGE,
    LOW_CLIP_SCORE,
    OUTSIDE_TOP_FRACTION,
    DUPLICATE,
    NEAR_DUPLICATE,
)


class FilterConfigError(VlforgeError):
    """An impossible filter configuration (e.g. --min-score together with --top-fraction)."""


class FilterConfig(BaseModel):
    """Quality filters of ``vlforge curate``. Every default keeps ordinary web images and captions."""

    min_image_size: int = Field(
        32,
        ge=0,
        description="Drop images whose shorter side (original size) is below this many pixels. 32 px keeps "
        "thumbnails and the 64 px demo images; DataComp's 'basic' filter uses 200 for its own pools.",
    )
    max_aspect_ratio: float = Field(
        3.0,
        ge=1.0,
        description="Drop images whose long/short side ratio exceeds this (banners, strips). 3.0 is "
        "DataComp's basic-filtering value.",
    )
    min_caption_chars: int = Field(
        5,
        ge=0,
        description="Drop captions shorter than this (stripped). LAION-5B dropped captions < 5 chars.",
    )
    max_caption_chars: int = Field(
        1000,
        ge=1,
        description="Drop captions longer than this: text dumps, not captions (CC3M/LAION captions are "
        "far shorter; CLIP reads only 77 tokens).",
    )
    exact_dedup: bool = Field(
        True, description="Drop exact duplicate images (same sha256), keeping the best-scored copy."
    )
    near_dup_threshold: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Drop images whose image-embedding cosine with a better-scored kept image is above "
        "this (faiss). Off by default: a weak scorer makes different images of one class look alike.",
    )
    languages: list[str] | None = Field(
        None,
        description="Keep only captions detected as one of these ISO 639-1 codes (e.g. ['en']); captions "
        "whose language cannot be told are kept. Off by default.",
    )
    min_score: float | None = Field(
        None, description="Drop pairs whose CLIP image-text cosine is below this (LAION: 0.28 for ViT-B/32)."
    )
    top_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Keep only this best-scored fraction of the pool (DataComp's best CLIP filter: 0.3).",
    )

    @model_validator(mode="after")
    def _one_score_rule(self) -> FilterConfig:
        if self.min_score is not None and self.top_fraction is not None:
            raise FilterConfigError(
                "use either --min-score (an absolute CLIP score threshold) or --top-fraction (keep the best "
                "fraction of the pool), not both"
            )
        return self

    @property
    def needs_scores(self) -> bool:
        return (
            self.min_score is not None or self.top_fraction is not None or self.near_dup_threshold is not None
        )


@dataclass
class Verdict:
    """What one filter decided: keep mask [N] and, for dropped rows, reason/value/detail."""

    keep: np.ndarray
    reasons: list[str | None]
    values: list[float | None]
    details: list[str | None]


def _verdict(keep: np.ndarray, reason: str, values=None, detail=None) -> Verdict:
    n = len(keep)
    values = values if values is not None else [None] * n
    return Verdict(
        keep=keep,
        reasons=[None if k else reason for k in keep],
        values=[
            None if k or v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            for k, v in zip(keep, values, strict=True)
        ],
        details=[None if k else (detail(i) if detail else None) for i, k in enumerate(keep)],
    )


def _col(table: pa.Table, name: str, default=None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


def keep_downloaded(table: pa.Table) -> Verdict:
    status = _col(table, "status", "success")
    errors = _col(table, "error_message")
    keep = np.array([s == "success" for s in status], dtype=bool)
    return _verdict(keep, DOWNLOAD_FAILED, detail=lambda i: f"{status[i]}: {errors[i] or ''}".strip(": "))


def keep_decoded(table: pa.Table) -> Verdict:
    """Rows the scorer could not decode (``decode_ok`` false); without a scorer every row passes."""
    ok = _col(table, "decode_ok", True)
    keep = np.array([o is not False for o in ok], dtype=bool)
    return _verdict(keep, DECODE_FAILED, detail=lambda i: "image bytes could not be decoded")


def _sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    w = _col(table, "original_width") if "original_width" in table.column_names else _col(table, "width")
    h = _col(table, "original_height") if "original_height" in table.column_names else _col(table, "height")
    fw, fh = _col(table, "width"), _col(table, "height")
    w = [a if a is not None else b for a, b in zip(w, fw, strict=True)]
    h = [a if a is not None else b for a, b in zip(h, fh, strict=True)]
    return np.array(w, dtype=float), np.array(h, dtype=float)


def keep_min_size(table: pa.Table, min_size: int) -> Verdict:
    w, h = _sizes(table)
    short = np.fmin(w, h)
    keep = ~(short < min_size)  # unknown sizes (NaN) are kept
    return _verdict(keep, TOO_SMALL, short, lambda i: f"shorter side {short[i]:.0f}px < {min_size}px")


def keep_aspect_ratio(table: pa.Table, max_ratio: float) -> Verdict:
    w, h = _sizes(table)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.fmax(w, h) / np.fmin(w, h)
    keep = ~(ratio > max_ratio)
    return _verdict(keep, BAD_ASPECT_RATIO, ratio, lambda i: f"aspect ratio {ratio[i]:.2f} > {max_ratio}")


def keep_caption_length(table: pa.Table, min_chars: int, max_chars: int) -> Verdict:
    lengths = np.array([len((c or "").strip()) for c in _col(table, "caption", "")], dtype=float)
    short, long_ = lengths < min_chars, lengths > max_chars
    v = _verdict(~(short | long_), CAPTION_TOO_SHORT, lengths)
    for i in np.flatnonzero(long_):
        v.reasons[i] = CAPTION_TOO_LONG
        v.details[i] = f"caption {lengths[i]:.0f} chars > {max_chars}"
    for i in np.flatnonzero(short):
        v.details[i] = f"caption {lengths[i]:.0f} chars < {min_chars}"
    return v


def keep_language(table: pa.Table, languages: list[str]) -> Verdict:
    from tasks.curate_language import detect_language

    detected = [detect_language(c or "") for c in _col(table, "caption", "")]
    allowed = {lang.lower() for lang in languages}
    keep = np.array([d == "und" or d in allowed for d in detected], dtype=bool)
    return _verdict(
        keep, WRONG_LANGUAGE, detail=lambda i: f"caption language {detected[i]} not in {sorted(allowed)}"
    )


def keep_min_score(scores: np.ndarray, min_score: float) -> Verdict:
    keep = ~(scores < min_score)
    return _verdict(keep, LOW_CLIP_SCORE, scores, lambda i: f"clip_score {scores[i]:.4f} < {min_score}")


def keep_top_fraction(scores: np.ndarray, eligible: np.ndarray, fraction: float) -> Verdict:
    """Keep the ``fraction`` best-scored rows among ``eligible`` (ties broken by order); others pass through."""
    idx = np.flatnonzero(eligible)
    n_keep = math.ceil(fraction * len(idx))
    order = idx[np.argsort(-scores[idx], kind="stable")]
    keep = np.ones(len(scores), dtype=bool)
    keep[order[n_keep:]] = False
    cutoff = float(scores[order[n_keep - 1]]) if n_keep else float("inf")
    return _verdict(
        keep,
        OUTSIDE_TOP_FRACTION,
        scores,
        lambda i: f"clip_score {scores[i]:.4f} outside top {fraction:.0%} (cutoff {cutoff:.4f})",
    )


def _rank_order(candidates: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    """Candidate indices best first (highest score; original order breaks ties)."""
    if scores is None:
        return candidates
    return candidates[np.argsort(-np.nan_to_num(scores[candidates], nan=-np.inf), kind="stable")]


def keep_exact_unique(table: pa.Table, candidates: np.ndarray, scores: np.ndarray | None) -> Verdict:
    """Among ``candidates`` (indices), keep the best-scored row of each sha256."""
    sha = _col(table, "sha256")
    keys = _col(table, "key")
    keep = np.ones(table.num_rows, dtype=bool)
    first: dict[str, int] = {}
    dup_of: dict[int, int] = {}
    for i in _rank_order(candidates, scores):
        if sha[i] is None:
            continue
        if sha[i] in first:
            keep[i] = False
            dup_of[i] = first[sha[i]]
        else:
            first[sha[i]] = i
    return _verdict(keep, DUPLICATE, detail=lambda i: f"same sha256 as key {keys[dup_of[i]]}")


def keep_near_unique(
    table: pa.Table, img_emb: np.ndarray, candidates: np.ndarray, scores: np.ndarray | None, threshold: float
) -> Verdict:
    """Greedy near-dup removal: visit best-scored first; drop a row whose image-embedding cosine with an
    already kept row exceeds ``threshold`` (faiss range search over L2-normalised embeddings [N, D])."""
    import faiss

    keys = _col(table, "key")
    keep = np.ones(table.num_rows, dtype=bool)
    values: list[float | None] = [None] * table.num_rows
    dup_of: dict[int, int] = {}
    if len(candidates) > 1:
        emb = np.ascontiguousarray(img_emb[candidates], dtype=np.float32)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        lims, sims, ids = index.range_search(emb, float(threshold))
        kept: set[int] = set()
        pos = {int(c): j for j, c in enumerate(candidates)}
        for i in _rank_order(candidates, scores):
            j = pos[int(i)]
            neigh = [
                (float(s), int(candidates[n]))
                for s, n in zip(sims[lims[j] : lims[j + 1]], ids[lims[j] : lims[j + 1]], strict=True)
                if n != j
            ]
            hits = [(s, n) for s, n in neigh if n in kept and s > threshold]
            if hits:
                s, n = max(hits)
                keep[i], values[i], dup_of[i] = False, s, n
            else:
                kept.add(int(i))
    return _verdict(
        keep,
        NEAR_DUPLICATE,
        values,
        lambda i: f"image cosine {values[i]:.4f} > {threshold} with key {keys[dup_of[i]]}",
    )


@dataclass
class Decisions:
    keep: np.ndarray  # [N] bool
    reason: list[str | None]
    reason_value: list[float | None]
    reason_detail: list[str | None]

    def counts(self) -> dict[str, int]:
        out = {"input": len(self.keep), "kept": int(self.keep.sum()), "rejected": int((~self.keep).sum())}
        for r in REASONS:
            out[r] = sum(1 for x in self.reason if x == r)
        return out


def apply_filters(
    table: pa.Table,
    config: FilterConfig,
    scores: np.ndarray | None = None,
    img_emb: np.ndarray | None = None,
) -> Decisions:
    """Run every configured filter in order; each row is dropped by at most one (the first) filter."""
    n = table.num_rows
    if config.needs_scores and scores is None:
        raise FilterConfigError(
            "--min-score, --top-fraction and --near-dup-threshold need CLIP scores: pass --scorer MODEL_URI"
        )
    dec = Decisions(np.ones(n, dtype=bool), [None] * n, [None] * n, [None] * n)

    def merge(v: Verdict) -> None:
        for i in np.flatnonzero(dec.keep & ~v.keep):
            dec.keep[i] = False
            dec.reason[i], dec.reason_value[i], dec.reason_detail[i] = v.reasons[i], v.values[i], v.details[i]

    merge(keep_downloaded(table))
    merge(keep_decoded(table))
    merge(keep_min_size(table, config.min_image_size))
    merge(keep_aspect_ratio(table, config.max_aspect_ratio))
    merge(keep_caption_length(table, config.min_caption_chars, config.max_caption_chars))
    if config.languages:
        merge(keep_language(table, config.languages))
    if config.min_score is not None:
        merge(keep_min_score(scores, config.min_score))
    if config.top_fraction is not None:
        merge(keep_top_fraction(scores, dec.keep.copy(), config.top_fraction))
    if config.exact_dedup:
        merge(keep_exact_unique(table, np.flatnonzero(dec.keep), scores))
    if config.near_dup_threshold is not None:
        merge(keep_near_unique(table, img_emb, np.flatnonzero(dec.keep), scores, config.near_dup_threshold))
    return dec
