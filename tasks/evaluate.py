"""Evaluation of a CLIP on held-out image-caption pairs that can decide between two models.

Retrieval recall@k both ways and zero-shot accuracy (when the captions name the class prompts), each with a
bootstrap 95% confidence interval over the held-out pairs, and the per-pair scores behind them, so that two
models evaluated on the same pairs can be compared with a *paired* bootstrap (the same resampled pairs for
both): :func:`paired_difference`.

Recall is computed on the full [N, N] similarity matrix of a held-out split (row i of the image and text
embeddings is a pair). Pairs whose captions are identical are interchangeable (synthetic and web data repeat
captions), so :func:`evaluate` groups them: retrieving any member of the query's group counts as a hit. The
bootstrap resamples queries (pairs) with the candidate set fixed, the usual practice for retrieval benchmarks.

The bootstrap is ``scipy.stats.bootstrap`` (percentile method; ``paired=True`` for a difference), seeded, so the
same scores always give the same interval and a promotion decision can be re-derived from logged scores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from models.clip import ClipBundle

DEFAULT_KS = (1, 5, 10)
ZEROSHOT = "zeroshot_accuracy"
MEAN_RECALL = "mean_recall"
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
_CHUNK_ELEMENTS = 4_000_000  # resampled indices held at once (32 MB of int64)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap 95% interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass
class Evaluation:
    """One model on one eval set: metrics with intervals, and the per-pair scores that paired tests need.

    ``per_pair[metric]`` is float [N] whose mean is the metric (hits are 0/1; for ``mean_recall`` a pair's
    share of its six recall hits). ``eval_data`` names the pairs (see ``tasks.train.data.read_eval_data``).
    """

    eval_data: str
    num_pairs: int
    per_pair: dict[str, np.ndarray] = field(repr=False)
    intervals: dict[str, Interval]
    class_prompts: tuple[str, ...] | None = (
        None  # what zero-shot used; another model is evaluated the same way
    )
    primary: str | None = None  # the metric promotion decides on, when not CLIP's (a VLM's accuracy)

    @classmethod
    def of(
        cls,
        eval_data: str,
        per_pair: dict[str, np.ndarray],
        class_prompts: Sequence[str] | None = None,
        resamples: int = BOOTSTRAP_RESAMPLES,
        seed: int = BOOTSTRAP_SEED,
        primary: str | None = None,
    ) -> Evaluation:
        """The evaluation whose per-pair scores are ``per_pair`` (intervals bootstrapped from them);
        ``primary`` names the metric promotion decides on (default: CLIP's, see :attr:`primary_metric`)."""
        n = {len(v) for v in per_pair.values()}
        if len(n) != 1:
            raise ValueError(f"per-pair scores must all cover the same pairs, got lengths {sorted(n)}")
        prompts = tuple(class_prompts) if class_prompts else None
        return cls(eval_data, n.pop(), per_pair, intervals(per_pair, resamples, seed), prompts, primary)

    @property
    def primary_metric(self) -> str:
        """The metric promotion decides on: ``primary`` when set, else zero-shot accuracy when the data has
        labels, else mean recall."""
        if self.primary is not None:
            return self.primary
        return ZEROSHOT if ZEROSHOT in self.per_pair else MEAN_RECALL

    def metrics(self) -> dict[str, float]:
        """Every metric with ``_ci_low``/``_ci_high`` beside it, and ``num_pairs`` (pass through
        :func:`mlflow_metric_names` before logging)."""
        out: dict[str, float] = {}
        for name, iv in self.intervals.items():
            out[name], out[name + CI_LOW], out[name + CI_HIGH] = iv.value, iv.low, iv.high
        out["num_pairs"] = float(self.num_pairs)
        return out


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, resamples: int, seed: int, paired: bool):
    """``scipy.stats.bootstrap``, percentile method, in batches that hold about ``_CHUNK_ELEMENTS`` resampled
    indices; the seed's generator draws [batch, N] row indices per batch, the same for every sample and column."""
    from scipy import stats  # imported when an interval is asked for: scipy.stats takes a while to import

    n = samples[0].shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap zero pairs")
    return stats.bootstrap(
        samples,
        statistic,
        n_resamples=resamples,
        batch=max(1, _CHUNK_ELEMENTS // n),
        vectorized=True,
        paired=paired,
        axis=0,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    )


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


def _single(values: np.ndarray, resamples: int) -> np.ndarray | None:
    """The bootstrap distribution of one pair (scipy refuses fewer than two): that pair's value every time."""
    return np.broadcast_to(values[0], (resamples, *values.shape[1:])).copy() if len(values) == 1 else None


def bootstrap_means(
    values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """Means of ``values`` [N] (or of each column of [N, M]) over ``resamples`` resamplings of the rows with
    replacement: [resamples] (or [resamples, M]). The same seed draws the same rows, so columns are paired."""
    values = np.asarray(values, dtype=np.float64)
    single = _single(values, resamples)
    if single is not None:
        return single
    distribution = _bootstrap((values,), _mean, resamples, seed, paired=False).bootstrap_distribution
    return np.moveaxis(distribution, -1, 0)  # scipy puts the resamples last: [M, B] -> [B, M]


def interval(
    values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Interval:
    """The mean of ``values`` [N] with its percentile bootstrap 95% interval."""
    return intervals({"value": values}, resamples, seed)["value"]


def intervals(
    per_pair: dict[str, np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, Interval]:
    """:func:`interval` of every metric, all from the same resampled pairs (one vectorised pass)."""
    names = list(per_pair)
    stacked = np.stack([np.asarray(per_pair[k], dtype=np.float64) for k in names], axis=1)  # [N, M]
    point = stacked.mean(axis=0) if len(stacked) else None
    if len(stacked) < 2:
        low = high = bootstrap_means(stacked, resamples, seed)[0]  # one pair, or zero (which raises)
    else:
        ci = _bootstrap((stacked,), _mean, resamples, seed, paired=False).confidence_interval
        low, high = ci.low, ci.high
    return {k: Interval(float(point[i]), float(low[i]), float(high[i])) for i, k in enumerate(names)}


def _difference_of_means(new: np.ndarray, old: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(new, axis=axis) - np.mean(old, axis=axis)


def paired_difference(
    new: np.ndarray, old: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Interval:
    """``mean(new) - mean(old)`` over the same pairs, with the paired bootstrap 95% interval: each resample
    draws the same pairs for both models, so what the pairs have in common (easy or hard) cancels out."""
    new, old = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if new.shape != old.shape or new.ndim != 1:
        raise ValueError(f"paired scores must be [N] over the same pairs, got {new.shape} and {old.shape}")
    point = float(np.mean(new) - np.mean(old)) if len(new) else None
    if len(new) < 2:
        same = float(bootstrap_means(new - old, resamples, seed)[0])
        return Interval(point, same, same)
    ci = _bootstrap((new, old), _difference_of_means, resamples, seed, paired=True).confidence_interval
    return Interval(point, float(ci.low), float(ci.high))


def retrieval_hits(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    groups: Sequence | None = None,
) -> dict[str, np.ndarray]:
    """Per-pair image-to-text and text-to-image hits at k of row-aligned, L2-normalised embeddings [N, D].

    A query hits at k when a correct item is among its k most similar candidates. The correct item of query i
    is candidate i; with ``groups`` (one label per row), every candidate of the same group is correct.
    Returns float [N] arrays ``i2t_recall@k``, ``t2i_recall@k`` for each k and ``mean_recall`` (each pair's
    share of those hits), whose means are the recalls.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must both be [N, D], got {image_emb.shape} and {text_emb.shape}"
        )
    n = image_emb.shape[0]
    if n == 0:
        raise ValueError("cannot compute retrieval metrics on zero pairs")
    if groups is None:
        correct = np.eye(n, dtype=bool)  # [N, N]
    else:
        labels = np.asarray(list(groups))
        if labels.shape != (n,):
            raise ValueError(f"groups must have one label per row ({n}), got shape {labels.shape}")
        correct = labels[:, None] == labels[None, :]
    sims = image_emb @ text_emb.T  # [N images, N texts]
    hits: dict[str, np.ndarray] = {}
    for direction, matrix in (("i2t", sims), ("t2i", sims.T)):
        best_rank = _best_correct_rank(matrix, correct)
        for k in ks:
            hits[f"{direction}_recall@{k}"] = (best_rank < k).astype(np.float64)
    hits[MEAN_RECALL] = np.mean(np.stack(list(hits.values())), axis=0)
    return hits


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    groups: Sequence | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k and ``mean_recall`` (see :func:`retrieval_hits`)."""
    return {k: float(np.mean(v)) for k, v in retrieval_hits(image_emb, text_emb, ks, groups).items()}


def _best_correct_rank(sims: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """For each query row, the 0-based rank of its best-scored correct candidate [N].

    The rank counts the wrong candidates scoring strictly higher than it, so a wrong candidate that merely
    ties the correct one (e.g. a duplicate embedding) does not push it out of the top k.
    """
    best_correct = np.where(correct, sims, -np.inf).max(axis=1, keepdims=True)  # [N, 1]
    return ((sims > best_correct) & ~correct).sum(axis=1)


def zeroshot_hits(image_emb: np.ndarray, prompt_emb: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """1.0 where an image's most similar class prompt is its label, else 0.0: image_emb [N, D],
    prompt_emb [C, D] -> [N]."""
    pred = np.argmax(np.asarray(image_emb) @ np.asarray(prompt_emb).T, axis=1)  # [N]
    return (pred == np.asarray(labels)).astype(np.float64)


def zeroshot_accuracy(image_emb: np.ndarray, prompt_emb: np.ndarray, labels: Sequence[int]) -> float:
    """Share of images whose most similar class prompt is their label: image_emb [N, D], prompt_emb [C, D]."""
    return float(np.mean(zeroshot_hits(image_emb, prompt_emb, labels)))


def class_labels_for(captions: list[str], class_prompts: list[str]) -> list[int] | None:
    """Each caption's index into ``class_prompts``: the prompt whose class phrase the caption contains.

    The class phrase is what follows the prompts' common prefix ("a photo of a red circle" -> "red circle").
    ``None`` when some caption names no class (zero-shot accuracy is then not defined for this data).
    """
    prefix = os.path.commonprefix([p.lower() for p in class_prompts])
    prefix = prefix[: prefix.rfind(" ") + 1] if " " in prefix else prefix
    phrases = [p.lower()[len(prefix) :].strip() for p in class_prompts]
    labels = []
    for caption in captions:
        text = f" {caption.lower()} "
        match = [i for i, ph in enumerate(phrases) if ph and f" {ph} " in text]
        if not match:
            return None
        labels.append(max(match, key=lambda i: len(phrases[i])))
    return labels


@torch.no_grad()
def embed_images(bundle: ClipBundle, images: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
    """L2-normalised image embeddings, float32 [N, D], computed in batches."""
    bundle.model.eval()
    device = next(bundle.model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = bundle.preprocess_images(images[start : start + batch_size]).to(device)
        out.append(bundle.embed_images(pixels).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def embed_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised text embeddings, float32 [N, D], computed in batches."""
    bundle.model.eval()
    device = next(bundle.model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenize(list(texts[start : start + batch_size]))
        out.append(bundle.embed_texts(**{k: v.to(device) for k, v in tokens.items()}).float().cpu().numpy())
    return np.concatenate(out)


def evaluate(
    bundle: ClipBundle,
    table: pa.Table,
    eval_data: str,
    *,
    class_prompts: list[str] | None = None,
    batch_size: int = 64,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Evaluation:
    """Retrieval recall@1/5/10 both ways, and zero-shot accuracy when every caption names one of
    ``class_prompts``, with bootstrap intervals, on the held-out pairs ``table`` (columns ``image``, encoded
    bytes, and ``caption``). ``eval_data`` names the pairs, so that another model can be compared on them."""
    missing = {"image", "caption"} - set(table.column_names)
    if missing:
        raise ValueError(f"evaluation table lacks column(s) {sorted(missing)}; it needs image and caption")
    if table.num_rows == 0:
        raise ValueError("evaluation table is empty: hold out at least one pair")
    images = table.column("image").to_pylist()
    captions = [str(c) for c in table.column("caption").to_pylist()]
    image_emb = embed_images(bundle, images, batch_size)
    text_emb = embed_texts(bundle, captions, batch_size)
    per_pair = retrieval_hits(image_emb, text_emb, groups=captions)
    labels = class_labels_for(captions, class_prompts) if class_prompts else None
    if labels is not None:
        per_pair[ZEROSHOT] = zeroshot_hits(image_emb, embed_texts(bundle, class_prompts, batch_size), labels)
    return Evaluation.of(eval_data, per_pair, class_prompts, resamples, seed)


def mlflow_metric_names(metrics: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
    """The metrics under names MLflow accepts (it rejects ``@``): ``i2t_recall@1`` -> ``eval_i2t_recall_at_1``."""
    return {prefix + re.sub(r"[^/\w.\- ]", "_", k.replace("@", "_at_")): float(v) for k, v in metrics.items()}


def evaluate_sets(
    bundle: ClipBundle, eval_refs: Sequence[str], settings, class_prompts: list[str] | None = None
) -> tuple[list[Evaluation], dict[str, float]]:
    """Evaluate on each named eval set (``tasks.train.data.read_eval_data``; sets of fewer than two pairs are
    skipped) and return the evaluations with their metrics named for MLflow: ``eval_<metric>`` for a held-out
    split, ``eval_<dataset>_<metric>`` for a whole dataset version."""
    from tasks.train.data import HELDOUT, read_eval_data

    evaluations, logged = [], {}
    for ref in eval_refs:
        table = read_eval_data(ref, settings)
        if table.num_rows < 2:
            continue
        evaluation = evaluate(bundle, table, ref, class_prompts=class_prompts)
        prefix = "eval_" if HELDOUT in ref else "eval_" + ref.split("@")[0] + "_"
        logged.update(mlflow_metric_names(evaluation.metrics(), prefix=prefix))
        evaluations.append(evaluation)
    return evaluations, logged
