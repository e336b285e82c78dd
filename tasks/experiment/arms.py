"""The arms of a curation experiment: which rows of the pool each one trains on, published as dataset versions.

Every arm is a real dataset version (``<pool>-<arm>``) whose manifest names the pool version, the scorer and the
rule, so ``vlforge lineage`` and the MLflow runs trained on it cover the experiment like any other dataset. An arm
whose pool, scorer and rule are unchanged is not written again (its newest version carries the same fingerprint).

The pool is scored in this process (one table of pool rows in memory): experiments compare recipes on pools a
training run can take in a few minutes, not the web-scale pools ``vlforge curate`` filters on Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from vlforge import defaults
from vlforge.datasets import DatasetVersion, VersionWriter, list_versions, resolve_dataset
from vlforge.errors import VlforgeError
from vlforge.hfformat import encoded_images
from vlforge.settings import Settings

UNFILTERED, THRESHOLD, TOP_FRACTION = "unfiltered", "threshold", "top_fraction"
RECAPTIONED, MIXED = "recaptioned", "mixed"  # the whole pool with a VLM's captions (--recaption-model)
# ... the threshold arm's rows with their own captions, the rows it rejects with the VLM's
RECAPTION_REJECTS = "recaption_rejects"
MIX_PROBABILITY = 0.5  # the mixed arm's chance of the synthetic caption per sample (LaCLIP/VeCLIP mix)
MERGED_CAPTION = "caption_merged"  # recaption_rejects' column: the original caption or the VLM's
RULE_KEYS = ("min_score", "top_fraction")


@dataclass(frozen=True)
class ArmSpec:
    name: str
    min_score: float | None = None  # keep pairs scoring at least this
    top_fraction: float | None = None  # keep this best-scored share of the pool
    rule: str = ""  # how the threshold was chosen, when it was
    caption_col: str = "caption"  # the recaptioned arms: caption_synthetic, and
    caption_mix: float | None = None  # its probability per sample when mixed with the original

    @property
    def recaptioned(self) -> bool:
        return self.caption_col != "caption" or self.caption_mix is not None

    def describe(self) -> str:
        if self.caption_col == MERGED_CAPTION:
            return (
                f"the whole pool: the original caption where its CLIP score is >= {self.min_score:.4f} (the "
                "threshold arm's rows), the VLM's where it is not"
            )
        if self.caption_mix is not None:
            return (
                f"the whole pool, the VLM's caption with probability {self.caption_mix:g}, else the original"
            )
        if self.recaptioned:
            return "the whole pool with the VLM's captions"
        if self.min_score is not None:
            return f"CLIP score >= {self.min_score:.4f}" + (f" ({self.rule})" if self.rule else "")
        if self.top_fraction is not None:
            return f"top {self.top_fraction:.0%} by CLIP score"
        return "the whole pool"


def parse_arm(text: str) -> ArmSpec:
    """``name=min_score:0.25`` or ``name=top_fraction:0.5`` (the ``--arm`` option)."""
    name, sep, rules = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise VlforgeError(f"--arm {text!r}: expected NAME=RULE:VALUE, e.g. top10=top_fraction:0.1")
    values: dict[str, float] = {}
    for rule in filter(None, (r.strip() for r in rules.split(","))):
        key, _, value = rule.partition(":")
        if key not in RULE_KEYS:
            raise VlforgeError(f"--arm {text!r}: unknown rule {key!r}; use one of {', '.join(RULE_KEYS)}")
        try:
            values[key] = float(value)
        except ValueError:
            raise VlforgeError(f"--arm {text!r}: {key} needs a number, got {value!r}") from None
    if len(values) != 1:
        raise VlforgeError(f"--arm {text!r}: give exactly one rule (min_score or top_fraction)")
    spec = ArmSpec(name, **values)
    if spec.top_fraction is not None and not 0 < spec.top_fraction <= 1:
        raise VlforgeError(f"--arm {text!r}: top_fraction must be in (0, 1]")
    return spec


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the score histogram: the cut that best separates two groups of scores (largest
    between-group variance). A noisy pool's matched and mismatched pairs form two such groups, and the cut needs
    no scorer-specific constant (LAION's 0.28 holds for OpenAI's ViT-B/32 only)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2 or np.ptp(scores) == 0:
        return float(scores.min()) if scores.size else 0.0
    hist, edges = np.histogram(scores, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)  # [B] rows at or below each bin
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def keep_mask(spec: ArmSpec, scores: np.ndarray) -> np.ndarray:
    """[N] bool: the rows the arm keeps. A top fraction keeps exactly ``ceil(f x N)`` rows (pool order breaks
    ties), as the curate stage does."""
    n = len(scores)
    if spec.min_score is not None:
        return np.asarray(scores) >= spec.min_score
    if spec.top_fraction is not None:
        k = math.ceil(spec.top_fraction * n)
        order = np.lexsort((np.arange(n), -np.asarray(scores)))  # best first, then pool order
        mask = np.zeros(n, dtype=bool)
        mask[order[:k]] = True
        return mask
    return np.ones(n, dtype=bool)


def score_pool(bundle, table: pa.Table, batch_size: int = defaults.SCORING_BATCH) -> np.ndarray:
    """CLIP score (image-caption cosine) of every row, float32 [N]."""
    from tasks.evaluate import embed_images, embed_texts

    images = encoded_images(table.column("image")).to_pylist()  # the pool is read in its stored layout
    captions = [str(c) for c in table.column("caption").to_pylist()]
    img = embed_images(bundle, images, batch_size)
    txt = embed_texts(bundle, captions, batch_size)
    return (img * txt).sum(axis=1).astype(np.float32)


def merged_caption_table(table: pa.Table, scores: np.ndarray, cut: float) -> tuple[pa.Table, np.ndarray]:
    """The recaptioned pool ``table`` with :data:`MERGED_CAPTION`: a row's original ``caption`` where its CLIP
    score (``scores`` [N], the pool's, in ``table``'s row order) is at least ``cut`` (the rows the threshold arm
    keeps), the VLM's ``caption_synthetic`` where filtering would drop the row. The filter judges the alt text
    (what it is good at) and the VLM rewrites only what the filter rejects, as the recaptioning studies' best
    mixes do (Nguyen et al. 2023, "Improving multimodal datasets with image captioning"). Choosing per row by
    which caption the scorer rates higher does not work when the scorer is the captioner's own vision tower
    (vlforge's flywheel): it prefers the VLM's caption even where that caption is wrong (BENCHMARKS.md).
    Returns the table and [N] bool, where the VLM's caption was taken."""
    from tasks.train.data import SYNTHETIC_CAPTION

    synthetic = np.asarray(scores) < cut
    chosen = [
        s if pick else c
        for c, s, pick in zip(
            table.column("caption").to_pylist(),
            table.column(SYNTHETIC_CAPTION).to_pylist(),
            synthetic,
            strict=True,
        )
    ]
    if MERGED_CAPTION in table.column_names:
        table = table.drop_columns([MERGED_CAPTION])
    return table.append_column(MERGED_CAPTION, pa.array(chosen, pa.string())), synthetic


def arm_dataset_name(pool: str, arm: str) -> str:
    return f"{pool}-{arm}".replace("_", "-")


def publish_arm(
    settings: Settings, pool: DatasetVersion, table: pa.Table, spec: ArmSpec, mask: np.ndarray, scorer: dict
) -> DatasetVersion:
    """The arm's rows as a version of ``<pool>-<arm>`` (reused when pool, scorer and rule are unchanged)."""
    name = arm_dataset_name(pool.name, spec.name)
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "pool": pool.ref,
                "hash": (pool.manifest or {}).get("content_hash"),
                "scorer": scorer,
                "arm": asdict(spec),
            },
            sort_keys=True,
        ).encode()  # fmt: skip
    ).hexdigest()
    for version in reversed(list_versions(settings, name)):
        dv = resolve_dataset(settings, f"{name}@{version}")
        if (dv.manifest or {}).get("experiment", {}).get("fingerprint") == fingerprint:
            return dv
    kept = table.filter(pa.array(mask))
    if kept.num_rows < 2:
        raise VlforgeError(f"arm {spec.name!r} ({spec.describe()}) keeps {kept.num_rows} rows of {pool.ref}")
    writer = VersionWriter(settings, name, fingerprint=fingerprint)
    writer.claim()
    writer.write_table("data", kept)
    manifest = {
        "counts": {
            "input": table.num_rows,
            "kept": kept.num_rows,
            "rejected": table.num_rows - kept.num_rows,
        },
        # The pool's own inputs, so lineage walks on from the arm to the raw batches and URL lists.
        "source": (pool.manifest or {}).get("source"),
        "raw_batches": (pool.manifest or {}).get("raw_batches") or [],
        "filters": {"min_score": spec.min_score, "top_fraction": spec.top_fraction},
        "scorer": scorer,
        "experiment": {
            "arm": spec.name,
            "rule": spec.describe(),
            "pool": pool.ref,
            "fingerprint": fingerprint,
        },
    }
    return writer.publish(manifest)


def recaption_arms(cut: float) -> list[ArmSpec]:
    """``recaptioned`` (synthetic captions only), ``mixed`` (each sample draws one, p = 0.5) and
    ``recaption_rejects`` (the original caption where its CLIP score is at least ``cut``, the threshold arm's,
    else the VLM's: :func:`merged_caption_table`)."""
    from tasks.train.data import SYNTHETIC_CAPTION

    return [
        ArmSpec(RECAPTIONED, caption_col=SYNTHETIC_CAPTION),
        ArmSpec(MIXED, caption_col=SYNTHETIC_CAPTION, caption_mix=MIX_PROBABILITY),
        ArmSpec(RECAPTION_REJECTS, caption_col=MERGED_CAPTION, min_score=cut),
    ]
