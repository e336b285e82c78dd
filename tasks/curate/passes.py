"""The curate stage's passes over the pool, one Ray task per raw shard (see ``tasks.curate.select``).

1. ``scan``: per-row filters, the shard's schema and counts; with ``--top-fraction``, the eligible rows' score
   keys stay in the object store (8 bytes a row) and a 65,536-bin histogram comes back.
2. ``refine`` / ``ties``: the rest of the exact top-fraction selection (tiny tasks over those keys).
3. ``dedup_map`` -> ``exact_reduce``: the sha256 shuffle.
4. ``near_sample`` -> ``fit_centroids`` -> ``near_map`` -> ``near_reduce``: clustered near dedup.
5. ``write`` (``tasks.curate.publish``): every decision applied, parts written, aggregates returned.

The driver only launches tasks, adds up histograms and counts as results arrive, and passes object refs along:
its memory depends on the number of shards, not rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tasks.curate import select
from tasks.curate.filters import FilterConfig, row_filters
from tasks.curate.shards import CurationInputError, ShardRef, read_embeddings, read_shard

ROWS_PER_PARTITION = 250_000  # shuffle partitions are sized so a reducer holds about this many rows
NEAR_SAMPLE_PER_CLUSTER = 64  # k-means sample: points per centroid (faiss warns below 39)
SEED = 20261130


@dataclass
class Eligible:
    """One shard's rows that passed the per-row filters, as a bitmap: 1.25 KB for a 10,000-row shard, so it is
    per-shard metadata (Ray keeps results under 100 KB in the driver's own memory, so nothing per row may come
    back this way). Later passes read the scores again from the shard's cache."""

    bits: np.ndarray  # packed bits, one per row
    n: int
    # Rows that copy an eval image (decontamination): how many; the rows themselves, their copy distances and
    # the eval rows they match are in ``decontam.contamination_uri`` (never in this result).
    contaminated: int = 0

    @property
    def rows(self) -> np.ndarray:
        return np.flatnonzero(np.unpackbits(self.bits, count=self.n)).astype(np.int32)


def eligible_keys(shard: ShardRef, elig: Eligible) -> np.ndarray:
    return select.sortable_keys(read_shard(shard, ["key"]).scores[elig.rows])


@dataclass
class ScanResult:
    """What the driver needs from a shard's scan: its schema (checked across the pool) and eligible count."""

    index: int
    schema: pa.Schema
    eligible: int
    hist: tuple[np.ndarray, np.ndarray] | None = None  # sparse high-bits histogram (select.high_histogram)


@dataclass
class Plan:
    """The pool-wide decisions every later pass applies to its shard: filters, top-fraction cutoff and each
    shard's places at the cutoff. Put in the object store once (its quotas are one integer per shard)."""

    config: FilterConfig
    cutoff: select.Cutoff | None = None
    quotas: list[int] = field(default_factory=list)


def scan(
    shard: ShardRef, config: FilterConfig, top: bool, evals, version_uri: str
) -> tuple[ScanResult, Eligible]:
    """The per-row filters over one shard, then (``evals``: an ``EvalIndex``) decontamination of the rows
    they kept, whose verdicts go to the staged version at ``version_uri`` for the write pass."""
    rows = read_shard(shard)
    dec = row_filters(rows.table, config, rows.scores)
    contaminated = 0
    if evals is not None and evals.size:
        from tasks.curate.copydetect import CopyMatcher
        from tasks.curate.decontam import (
            contamination_uri,
            keep_uncontaminated,
            save_contamination,
            shard_images,
        )

        v = keep_uncontaminated(shard_images(shard.uri), CopyMatcher(evals), np.flatnonzero(dec.keep))
        contaminated = save_contamination(contamination_uri(version_uri, shard.index), v)
        dec.merge(v)
    elig = np.flatnonzero(dec.keep)
    keys = select.sortable_keys(rows.scores[elig]) if top else None
    res = ScanResult(shard.index, rows.table.schema, len(elig), select.high_histogram(keys) if top else None)
    return res, Eligible(np.packbits(dec.keep), len(dec.keep), contaminated)


def refine(shard: ShardRef, elig: Eligible, high_bin: int) -> tuple[np.ndarray, np.ndarray]:
    return select.low_histogram(eligible_keys(shard, elig), high_bin)


def ties(shard: ShardRef, elig: Eligible, key: int) -> int:
    return int((eligible_keys(shard, elig) == key).sum())


def survivors(elig: Eligible, plan: Plan, index: int, scores: np.ndarray | None) -> np.ndarray:
    """Rows of the shard still kept after the per-row filters and the top fraction (int32 positions)."""
    rows = elig.rows
    if plan.cutoff is None:
        return rows
    return rows[select.in_top(select.sortable_keys(scores[rows]), plan.cutoff, plan.quotas[index])]


def _slim(shard: ShardRef, data, rows: np.ndarray) -> pa.Table:
    """(key, score, shard, row, sha256) of the shard's ``rows``."""
    t = data.table.take(pa.array(rows))
    score = data.scores[rows] if data.scores is not None else np.full(len(rows), np.nan, np.float32)
    cols = {
        "key": t.column("key").cast(pa.string()),
        "sha256": t.column("sha256").cast(pa.string())
        if "sha256" in t.column_names
        else pa.nulls(len(rows), pa.string()),
        "score": pa.array(score, pa.float32()),
        "shard": pa.array(np.full(len(rows), shard.index, np.int32)),
        "row": pa.array(rows.astype(np.int32)),
    }
    return pa.table(cols)


def dedup_map(shard: ShardRef, elig: Eligible, plan: Plan, parts: int) -> select.Partitioned:
    data = read_shard(shard, ["key", "sha256"])
    slim = _slim(shard, data, survivors(elig, plan, shard.index, data.scores))
    slim = slim.filter(slim.column("sha256").is_valid())  # rows without a hash are never duplicates
    return select.partitioned(slim, select.partition_of(slim.column("sha256"), parts), parts)


def after_exact(shard: ShardRef, elig: Eligible, plan: Plan, exact: list[pa.Table], scores) -> np.ndarray:
    rows = survivors(elig, plan, shard.index, scores)
    lost = select.losers_of(shard.index, exact).column("row").to_numpy()
    return rows[~np.isin(rows, lost)]


def near_sample(shard: ShardRef, elig: Eligible, plan: Plan, rate: float, *exact: pa.Table) -> np.ndarray:
    data = read_shard(shard, ["key"])
    rows = after_exact(shard, elig, plan, list(exact), data.scores)
    pick = np.random.default_rng([SEED, shard.index]).random(len(rows)) < rate
    if not pick.any():
        return np.zeros((0, 0), np.float32)
    return read_embeddings(shard, data.cache_rows, rows[pick])


def fit_centroids(k: int, *samples: np.ndarray) -> np.ndarray:
    import faiss

    x = np.concatenate([s for s in samples if s.size])
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=SEED, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(x, np.float32))
    return km.centroids


def near_map(shard: ShardRef, elig: Eligible, plan: Plan, parts: int, centroids, *exact: pa.Table):
    data = read_shard(shard, ["key", "sha256"])
    rows = after_exact(shard, elig, plan, list(exact), data.scores)
    slim = _slim(shard, data, rows)
    emb = read_embeddings(shard, data.cache_rows, rows)
    if centroids is None:
        cluster = np.zeros(len(rows), dtype=np.int32)
    else:
        import faiss

        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        cluster = index.search(emb, 1)[1][:, 0].astype(np.int32) if len(rows) else np.zeros(0, np.int32)
    dim = emb.shape[1] if emb.ndim == 2 and emb.shape[1] else 1
    slim = slim.append_column("cluster", pa.array(cluster, pa.int32()))
    slim = slim.append_column(
        "emb", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim)
    )
    return select.partitioned(slim, (cluster % parts).astype(np.int64), parts)


def partitions(rows: int, cpus: int) -> int:
    """Shuffle partitions: every CPU busy, and no reducer holding more than ``ROWS_PER_PARTITION`` rows."""
    return max(1, min(max(cpus, math.ceil(rows / ROWS_PER_PARTITION)), 4096))


def check_schemas(results: list[ScanResult], uris: dict[int, str]) -> pa.Schema:
    """The pool's schema: shards may lack a carried column (it becomes null) but must not disagree on a type."""
    fields: dict[str, tuple[pa.DataType, int]] = {}
    for r in sorted(results, key=lambda r: r.index):
        for f in r.schema:
            if f.name not in fields or fields[f.name][0] != f.type and pa.types.is_null(fields[f.name][0]):
                fields[f.name] = (f.type, r.index)
            elif fields[f.name][0] != f.type and not pa.types.is_null(f.type):
                first = fields[f.name][1]
                raise CurationInputError(
                    f"the pool's shards disagree on column {f.name!r}: {fields[f.name][0]} in {uris[first]} "
                    f"but {f.type} in {uris[r.index]}; re-ingest one of the batches or curate them as separate "
                    "sources"
                )
    return pa.schema([pa.field(n, t) for n, (t, _) in fields.items()])
