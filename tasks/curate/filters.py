"""Curation filters: small units ``keep(table, ...) -> Verdict`` (a keep mask, the reason, the deciding value).

Per-row units (download/decode status, size, aspect, caption length, language, min score) look at one batch of
candidate rows (raw metadata joined with CLIP scores) and are vectorised: :func:`row_filters` runs them on one raw
shard inside a Ray task (``tasks.curate.passes``). The global units (top fraction, exact and near dedup) need
the whole pool: in production they run distributed (``tasks.curate.passes``: a radix select over scores, a
hash-partitioned shuffle by sha256, clustered near-dedup), and the kernels below are what each reducer runs on its
partition. :func:`apply_filters` composes everything over one in-memory table: the reference the distributed
path is tested against. A row is judged only by the first filter that drops it, so every rejected row carries
exactly one reason; details are formatted only for dropped rows.

Defaults never drop ordinary images (see :class:`FilterConfig` for where each comes from).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, model_validator

from vlforge.defaults import DEFAULT_MODEL_URI
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
CONTAMINATED = "contaminated"  # a copy of an eval set's image (tasks.curate.decontam)
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
    CONTAMINATED,
    OUTSIDE_TOP_FRACTION,
    DUPLICATE,
    NEAR_DUPLICATE,
)


class FilterConfigError(VlforgeError):
    """An impossible filter configuration (e.g. --min-score together with --top-fraction)."""


def check_score_rule(
    min_score: float | None, top_fraction: float | None, scorer: str | None = "unknown"
) -> None:
    """The one validation of the CLIP-score rule (CLI, Prefect form, Python API): an absolute threshold or a top
    fraction, not both, and either needs a scorer (pass ``scorer`` when it is known)."""
    if min_score is not None and top_fraction is not None:
        raise FilterConfigError(
            "give either --min-score or --top-fraction, not both: --min-score is an absolute CLIP score "
            "threshold, --top-fraction keeps the best-scored fraction of the pool"
        )
    if (min_score is not None or top_fraction is not None) and not scorer:
        raise FilterConfigError(
            "--min-score and --top-fraction need CLIP scores: pass --scorer MODEL_URI "
            f"(e.g. {DEFAULT_MODEL_URI})"
        )


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
    near_dup_cluster_rows: int = Field(
        10_000,
        ge=1000,
        description="Near dedup compares images within k-means clusters of about this many rows (SemDeDup), "
        "never all pairs: a pool up to this size is one cluster and gets the exact all-pairs answer; beyond "
        "it, a pair split across two clusters is missed (BENCHMARKS.md, Scale, measures how many).",
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
    decontaminate_against: list[str] | None = Field(
        None,
        description="Eval sets (NAME or NAME@VERSION, repeatable) whose images, and near copies of them "
        "(re-encoded, rescaled, border-cropped), are dropped from the pool as 'contaminated'. Default: every "
        "dataset curated with --eval-set; 'none': no decontamination.",
    )

    @model_validator(mode="after")
    def _one_score_rule(self) -> FilterConfig:
        check_score_rule(self.min_score, self.top_fraction)
        if self.min_caption_chars > self.max_caption_chars:
            raise FilterConfigError(
                f"--min-caption-chars ({self.min_caption_chars}) is above --max-caption-chars "
                f"({self.max_caption_chars}): every caption would be dropped"
            )
        if self.languages:
            from tasks.curate.language import SUPPORTED_LANGUAGES

            unknown = [code for code in self.languages if code.lower() not in SUPPORTED_LANGUAGES]
            if unknown:
                raise FilterConfigError(
                    f"--language {unknown[0]!r} is not a language code the caption-language detector knows: "
                    f"use ISO 639-1 codes among {', '.join(SUPPORTED_LANGUAGES)}"
                )
        return self

    @property
    def needs_scores(self) -> bool:
        return (
            self.min_score is not None or self.top_fraction is not None or self.near_dup_threshold is not None
        )


@dataclass
class Verdict:
    """What one filter decided over N rows: keep mask, the reason of dropped rows, the value that decided it
    (NaN: none) and the detail of dropped row ``i`` (formatted only for dropped rows)."""

    keep: np.ndarray  # [N] bool
    reason: str | np.ndarray  # one reason, or [N] object array where a filter has several
    values: np.ndarray | None  # [N] float64
    detail: Callable[[int], str | None]


def _n(table: pa.Table) -> int:
    return table.num_rows


def _floats(table: pa.Table, name: str) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    return table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)


def _strings(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    return table.column(name) if name in table.column_names else None


def keep_downloaded(table: pa.Table) -> Verdict:
    status = _strings(table, "status")
    if status is None:
        return Verdict(np.ones(_n(table), bool), DOWNLOAD_FAILED, None, lambda i: None)
    keep = pc.fill_null(pc.equal(status, "success"), False).to_numpy(zero_copy_only=False)
    errors = _strings(table, "error_message")

    def detail(i: int) -> str:
        err = errors[i].as_py() if errors is not None else None
        return f"{status[i].as_py()}: {err or ''}".strip(": ")

    return Verdict(keep, DOWNLOAD_FAILED, None, detail)


def keep_decoded(table: pa.Table) -> Verdict:
    """Rows the scorer could not decode (``decode_ok`` false); without a scorer every row passes."""
    ok = _strings(table, "decode_ok")
    if ok is None:
        return Verdict(np.ones(_n(table), bool), DECODE_FAILED, None, lambda i: None)
    keep = pc.fill_null(ok, True).to_numpy(zero_copy_only=False).astype(bool)
    return Verdict(keep, DECODE_FAILED, None, lambda i: "image bytes could not be decoded")


def _sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Original width/height where img2dataset recorded them (before its resize), else the stored size; NaN
    where neither is known."""
    nan = np.full(_n(table), np.nan)
    out = []
    for orig, stored in (("original_width", "width"), ("original_height", "height")):
        a, b = _floats(table, orig), _floats(table, stored)
        a = nan if a is None else a
        b = nan if b is None else b
        out.append(np.where(np.isnan(a), b, a))
    return out[0], out[1]


def keep_min_size(table: pa.Table, min_size: int) -> Verdict:
    w, h = _sizes(table)
    short = np.fmin(w, h)
    keep = ~(short < min_size)  # unknown sizes (NaN) are kept
    return Verdict(keep, TOO_SMALL, short, lambda i: f"shorter side {short[i]:.0f}px < {min_size}px")


def keep_aspect_ratio(table: pa.Table, max_ratio: float) -> Verdict:
    w, h = _sizes(table)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.fmax(w, h) / np.fmin(w, h)
    keep = ~(ratio > max_ratio)
    return Verdict(keep, BAD_ASPECT_RATIO, ratio, lambda i: f"aspect ratio {ratio[i]:.2f} > {max_ratio}")


def caption_lengths(table: pa.Table) -> np.ndarray:
    """Characters of each stripped caption (0 for a missing one), float64 [N]."""
    cap = _strings(table, "caption")
    if cap is None:
        return np.zeros(_n(table))
    lengths = pc.utf8_length(pc.utf8_trim_whitespace(cap.cast(pa.string())))
    return pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False).astype(np.float64)


def keep_caption_length(table: pa.Table, min_chars: int, max_chars: int) -> Verdict:
    lengths = caption_lengths(table)
    short, long_ = lengths < min_chars, lengths > max_chars
    reason = np.where(long_, CAPTION_TOO_LONG, CAPTION_TOO_SHORT).astype(object)

    def detail(i: int) -> str:
        if long_[i]:
            return f"caption {lengths[i]:.0f} chars > {max_chars}"
        return f"caption {lengths[i]:.0f} chars < {min_chars}"

    return Verdict(~(short | long_), reason, lengths, detail)


def keep_language(table: pa.Table, languages: list[str]) -> Verdict:
    from tasks.curate.language import detect_languages

    cap = _strings(table, "caption")
    captions = cap.to_pylist() if cap is not None else [""] * _n(table)
    detected = detect_languages([c or "" for c in captions])
    allowed = {lang.lower() for lang in languages}
    keep = np.array([d == "und" or d in allowed for d in detected], dtype=bool)
    return Verdict(
        keep,
        WRONG_LANGUAGE,
        None,
        lambda i: f"caption language {detected[i]} not in {sorted(allowed)}",
    )


def keep_min_score(scores: np.ndarray, min_score: float) -> Verdict:
    keep = ~(scores < min_score)
    return Verdict(keep, LOW_CLIP_SCORE, scores, lambda i: f"clip_score {scores[i]:.4f} < {min_score}")


def top_fraction_detail(score: float, fraction: float, cutoff: float) -> str:
    return f"clip_score {score:.4f} outside top {fraction:.0%} (cutoff {cutoff:.4f})"


def keep_top_fraction(scores: np.ndarray, eligible: np.ndarray, fraction: float) -> Verdict:
    """Keep the ``fraction`` best-scored rows among ``eligible`` (ties broken by order); others pass through.

    In-memory reference of the distributed radix select in ``tasks.curate.passes`` (same rows, same order)."""
    idx = np.flatnonzero(eligible)
    n_keep = math.ceil(fraction * len(idx))
    order = idx[np.argsort(-scores[idx], kind="stable")]
    keep = np.ones(len(scores), dtype=bool)
    keep[order[n_keep:]] = False
    cutoff = float(scores[order[n_keep - 1]]) if n_keep else float("inf")
    return Verdict(
        keep, OUTSIDE_TOP_FRACTION, scores, lambda i: top_fraction_detail(scores[i], fraction, cutoff)
    )


def rank_order(scores: np.ndarray | None, n: int) -> np.ndarray:
    """Positions 0..n-1 best first: highest score, then original order (NaN scores last)."""
    if scores is None:
        return np.arange(n)
    return np.argsort(-np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf), kind="stable")


def best_of_each_hash(hashes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For rows visited in ``order`` (best first), the position of the first row with the same hash: the
    row itself when it is the best copy, -1 for rows without a hash. ``hashes``: [N] object array."""
    winner = np.full(len(hashes), -1, dtype=np.int64)
    first: dict = {}
    for i in order:
        h = hashes[i]
        if h is None:
            continue
        winner[i] = first.setdefault(h, i)
    return winner


def greedy_near_unique(emb: np.ndarray, order: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy near-dup removal over L2-normalised embeddings [N, D] visited in ``order`` (best first): a row
    whose cosine with an already kept row exceeds ``threshold`` is dropped. Returns (dup_of [N], the index of
    the kept row it duplicates or -1; cosine [N], NaN for kept rows). faiss range search, O(N^2 D): callers
    hand it one cluster at a time."""
    import faiss

    n = len(emb)
    dup_of = np.full(n, -1, dtype=np.int64)
    cos = np.full(n, np.nan)
    if n < 2:
        return dup_of, cos
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    lims, sims, ids = index.range_search(emb, float(threshold))
    kept = np.zeros(n, dtype=bool)
    for j in order:
        nb, sim = ids[lims[j] : lims[j + 1]], sims[lims[j] : lims[j + 1]]
        hit = (nb != j) & kept[nb] & (sim > threshold)
        if hit.any():
            best = int(np.argmax(np.where(hit, sim, -np.inf)))
            dup_of[j], cos[j] = nb[best], float(sim[best])
        else:
            kept[j] = True
    return dup_of, cos


def keep_exact_unique(table: pa.Table, candidates: np.ndarray, scores: np.ndarray | None) -> Verdict:
    """Among ``candidates`` (indices), keep the best-scored row of each sha256."""
    keys = table.column("key")
    sha = np.asarray(table.column("sha256").to_pylist(), dtype=object)[candidates]
    winner = best_of_each_hash(
        sha, rank_order(None if scores is None else scores[candidates], len(candidates))
    )
    keep = np.ones(_n(table), dtype=bool)
    lose = (winner >= 0) & (winner != np.arange(len(candidates)))
    keep[candidates[lose]] = False
    dup_of = dict(zip(candidates[lose].tolist(), candidates[winner[lose]].tolist(), strict=True))
    return Verdict(keep, DUPLICATE, None, lambda i: f"same sha256 as key {keys[dup_of[i]].as_py()}")


def keep_near_unique(
    table: pa.Table, img_emb: np.ndarray, candidates: np.ndarray, scores: np.ndarray | None, threshold: float
) -> Verdict:
    """Among ``candidates``, greedy near-dup removal by image-embedding cosine (all pairs: one cluster)."""
    keys = table.column("key")
    order = rank_order(None if scores is None else scores[candidates], len(candidates))
    dup_of, cos = greedy_near_unique(img_emb[candidates], order, threshold)
    keep = np.ones(_n(table), dtype=bool)
    values = np.full(_n(table), np.nan)
    lose = dup_of >= 0
    keep[candidates[lose]] = False
    values[candidates[lose]] = cos[lose]
    of = dict(zip(candidates[lose].tolist(), candidates[dup_of[lose]].tolist(), strict=True))
    return Verdict(
        keep,
        NEAR_DUPLICATE,
        values,
        lambda i: f"image cosine {values[i]:.4f} > {threshold} with key {keys[of[i]].as_py()}",
    )


@dataclass
class Decisions:
    """Per-row outcome over N rows: keep, and for dropped rows the reason, deciding value and detail."""

    keep: np.ndarray  # [N] bool
    reasons: np.ndarray = field(default=None)  # [N] object: reason name or None
    values: np.ndarray = field(default=None)  # [N] float64, NaN: none
    details: np.ndarray = field(default=None)  # [N] object

    def __post_init__(self):
        n = len(self.keep)
        if self.reasons is None:
            self.reasons = np.full(n, None, dtype=object)
        if self.values is None:
            self.values = np.full(n, np.nan)
        if self.details is None:
            self.details = np.full(n, None, dtype=object)

    @classmethod
    def all_kept(cls, n: int) -> Decisions:
        return cls(np.ones(n, dtype=bool))

    def merge(self, v: Verdict) -> None:
        """Drop the rows ``v`` drops that are still kept (the first filter to drop a row decides)."""
        drop = np.flatnonzero(self.keep & ~v.keep)
        if not len(drop):
            return
        self.keep[drop] = False
        self.reasons[drop] = v.reason[drop] if isinstance(v.reason, np.ndarray) else v.reason
        if v.values is not None:
            self.values[drop] = v.values[drop]
        self.details[drop] = [v.detail(int(i)) for i in drop]

    @property
    def reason(self) -> list[str | None]:
        return self.reasons.tolist()

    @property
    def reason_value(self) -> list[float | None]:
        return [None if math.isnan(v) else float(v) for v in self.values]

    @property
    def reason_detail(self) -> list[str | None]:
        return self.details.tolist()

    def counts(self) -> dict[str, int]:
        out = {"input": len(self.keep), "kept": int(self.keep.sum()), "rejected": int((~self.keep).sum())}
        names, freq = np.unique(self.reasons[~self.keep].astype(str), return_counts=True)
        found = dict(zip(names.tolist(), freq.tolist(), strict=True))
        for r in REASONS:
            out[r] = int(found.get(r, 0))
        return out


def check_scores(config: FilterConfig, scores: np.ndarray | None) -> None:
    if config.needs_scores and scores is None:
        raise FilterConfigError(
            "--min-score, --top-fraction and --near-dup-threshold need CLIP scores: pass --scorer MODEL_URI"
        )


def row_filters(table: pa.Table, config: FilterConfig, scores: np.ndarray | None = None) -> Decisions:
    """The per-row filters, in order, over one batch of rows (one raw shard in production)."""
    check_scores(config, scores)
    dec = Decisions.all_kept(table.num_rows)
    dec.merge(keep_downloaded(table))
    dec.merge(keep_decoded(table))
    dec.merge(keep_min_size(table, config.min_image_size))
    dec.merge(keep_aspect_ratio(table, config.max_aspect_ratio))
    dec.merge(keep_caption_length(table, config.min_caption_chars, config.max_caption_chars))
    if config.languages:
        dec.merge(keep_language(table, config.languages))
    if config.min_score is not None:
        dec.merge(keep_min_score(scores, config.min_score))
    return dec


def apply_filters(
    table: pa.Table,
    config: FilterConfig,
    scores: np.ndarray | None = None,
    img_emb: np.ndarray | None = None,
) -> Decisions:
    """Every configured filter over one in-memory table (the reference for ``tasks.curate.passes``): the
    per-row filters, then top fraction, exact dedup and near dedup, each dropping at most the rows still kept."""
    dec = row_filters(table, config, scores)
    if config.top_fraction is not None:
        dec.merge(keep_top_fraction(scores, dec.keep.copy(), config.top_fraction))
    if config.exact_dedup:
        dec.merge(keep_exact_unique(table, np.flatnonzero(dec.keep), scores))
    if config.near_dup_threshold is not None:
        dec.merge(
            keep_near_unique(table, img_emb, np.flatnonzero(dec.keep), scores, config.near_dup_threshold)
        )
    return dec
