"""Global decisions without per-row state in the driver: the top-fraction cutoff and the dedup shuffles.

**Top fraction** is an exact distributed selection (a radix select): scores map to order-preserving uint32 keys;
each shard's task counts its eligible keys by their high 16 bits, the driver adds the 65,536-bin histograms and
finds the bin holding the cutoff; a second pass counts the low 16 bits inside that bin, which pins the exact
cutoff key; a third counts the rows *at* the cutoff per shard, and the driver hands out the remaining places to
the shards in pool order. So the kept share is exact (``ceil(fraction * eligible)`` rows) and ties are broken by
pool order, as the in-memory reference (``filters.keep_top_fraction``) does. The driver holds two histograms
(1 MB) and one integer per shard.

**Exact dedup** is a hash-partitioned shuffle: map tasks send each surviving row's (sha256, score, shard, row,
key) to partition ``hash(sha256) % P``; a reducer per partition sorts by (sha256, score desc, pool order) and
drops every row but the first of each hash, naming the winner's key.

**Near dedup** is SemDeDup's: k-means on a sample of the survivors' image embeddings (k = survivors /
``near_dup_cluster_rows``, fitted in a Ray task), each survivor goes to its nearest centroid, and a reducer runs
the greedy all-pairs kernel (``filters.greedy_near_unique``) within each cluster in rank order. A pool of up to
``near_dup_cluster_rows`` survivors is one cluster: exactly the all-pairs answer. Beyond that, a pair whose two
images fall in different clusters is not compared (the price of never doing all pairs; measured in
BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HIGH = 1 << 16


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys with the order of the float32 ``scores`` (NaN lowest)."""
    s = np.asarray(scores, dtype=np.float32)
    bits = s.view(np.uint32)
    keys = np.where(bits & 0x80000000, ~bits, bits | 0x80000000).astype(np.uint32)
    keys[np.isnan(s)] = 0
    return keys


def key_to_score(key: int) -> float:
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _walk_down(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest (1-based) and how many lie in higher bins."""
    above = np.cumsum(hist[::-1])  # above[j]: count in the top j+1 bins
    j = int(np.searchsorted(above, rank))  # first j with above[j] >= rank
    b = len(hist) - 1 - j
    return b, int(above[j] - hist[b])


@dataclass(frozen=True)
class Cutoff:
    """Rows with key > ``key`` are in; of those with key == ``key``, each shard keeps its first ``quota``."""

    key: int
    fraction: float
    eligible: int
    n_keep: int

    @property
    def score(self) -> float:
        return key_to_score(self.key) if self.n_keep else float("inf")


def _sparse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 65,536-bin histogram as (bins, counts) of its non-empty bins: scores occupy a few thousand bins, and
    what a task returns to the driver is mapped into the driver's memory."""
    bins, counts = np.unique(values, return_counts=True)
    return bins.astype(np.uint16), counts.astype(np.int64)


def high_histogram(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _sparse(keys >> 16)


def low_histogram(keys: np.ndarray, high_bin: int) -> tuple[np.ndarray, np.ndarray]:
    return _sparse(keys[(keys >> 16) == high_bin] & 0xFFFF)


def add_sparse(hist: np.ndarray, sparse: tuple[np.ndarray, np.ndarray]) -> None:
    """Add a sparse histogram into a dense [65,536] one."""
    bins, counts = sparse
    np.add.at(hist, bins.astype(np.int64), counts)


def cutoff_bin(hist: np.ndarray, fraction: float) -> tuple[int, int, int, int]:
    """(eligible, rows to keep, the high bin of the cutoff, rows in higher bins)."""
    eligible = int(hist.sum())
    n_keep = math.ceil(fraction * eligible)
    if n_keep == 0:
        return eligible, 0, -1, 0
    b, above = _walk_down(hist, n_keep)
    return eligible, n_keep, b, above


def cutoff_key(low_hist: np.ndarray, high_bin: int, rank_in_bin: int) -> tuple[int, int]:
    """(the exact cutoff key, rows inside the bin above it)."""
    lo, above = _walk_down(low_hist, rank_in_bin)
    return (high_bin << 16) | lo, above


def tie_quotas(ties_per_shard: list[int], needed: int) -> list[int]:
    """Places at the cutoff score, handed to shards in pool order."""
    out = []
    for t in ties_per_shard:
        q = min(t, needed)
        out.append(q)
        needed -= q
    return out


def in_top(keys: np.ndarray, cut: Cutoff, quota: int) -> np.ndarray:
    """[N] bool over one shard's eligible keys (in row order)."""
    above = keys > cut.key
    at = keys == cut.key
    return above | (at & (np.cumsum(at) <= quota))


# -- shuffles ------------------------------------------------------------------------------------------------


def partition_of(values: pa.Array, parts: int) -> np.ndarray:
    """A partition per value, stable across processes (pandas' keyed hash, not Python's salted one)."""
    import pandas as pd

    if parts == 1:
        return np.zeros(len(values), dtype=np.int64)
    h = pd.util.hash_array(np.asarray(values.to_pylist(), dtype=object))
    return (h % np.uint64(parts)).astype(np.int64)


@dataclass(frozen=True)
class Partitioned:
    """One map task's output for a shuffle: its rows sorted by partition, and where each partition starts.

    One object per map task, not one per partition: Ray keeps task results under 100 KB in the memory of the
    process that launched the task (the driver), and a map task's slice for one partition is often that small."""

    table: pa.Table
    bounds: np.ndarray  # [parts + 1]

    def part(self, p: int) -> pa.Table:
        return self.table.slice(int(self.bounds[p]), int(self.bounds[p + 1] - self.bounds[p]))


def partitioned(table: pa.Table, part: np.ndarray, parts: int) -> Partitioned:
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return Partitioned(table.take(pa.array(order)), bounds)


def _rank_sort(table: pa.Table, group: str) -> pa.Table:
    """Rows sorted by group, then best first: score desc (NaN last), then pool order (shard, row)."""
    score = pc.fill_null(table.column("score"), float("-inf"))
    score = pc.if_else(pc.is_nan(score), float("-inf"), score)
    t = table.set_column(table.schema.get_field_index("score"), "score", score)
    return t.sort_by(
        [(group, "ascending"), ("score", "descending"), ("shard", "ascending"), ("row", "ascending")]
    )


LOSERS_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("row", pa.int32()), ("winner_key", pa.string()), ("value", pa.float64())]
)


def exact_losers(tables: list[pa.Table]) -> pa.Table:
    """Reducer of the sha256 shuffle: every row but the best of its hash, with the winner's key."""
    live = [x for x in tables if x.num_rows]
    if not live:
        return LOSERS_SCHEMA.empty_table()
    t = _rank_sort(pa.concat_tables(live), "sha256")
    sha = t.column("sha256").to_numpy(zero_copy_only=False)
    first = np.ones(len(sha), dtype=bool)
    first[1:] = sha[1:] != sha[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(sha)), 0))
    lose = np.flatnonzero(~first)
    keys = t.column("key").take(pa.array(group_start[lose]))
    out = pa.table(
        {
            "shard": t.column("shard").take(pa.array(lose)),
            "row": t.column("row").take(pa.array(lose)),
            "winner_key": keys,
            "value": pa.nulls(len(lose), pa.float64()),
        },
        schema=LOSERS_SCHEMA,
    )
    return out.sort_by([("shard", "ascending"), ("row", "ascending")])


def near_losers(tables: list[pa.Table], threshold: float) -> pa.Table:
    """Reducer of the cluster shuffle: greedy near dedup within each cluster, best first."""
    from tasks.curate.filters import greedy_near_unique

    live = [x for x in tables if x.num_rows]
    if not live:
        return LOSERS_SCHEMA.empty_table()
    t = _rank_sort(pa.concat_tables(live), "cluster")
    cluster = t.column("cluster").to_numpy()
    emb_col = t.column("emb").combine_chunks()
    emb = emb_col.flatten().to_numpy(zero_copy_only=False).reshape(len(t), emb_col.type.list_size)
    bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1], True])
    lose_rows, winners, values = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        dup_of, cos = greedy_near_unique(emb[a:b], np.arange(b - a), threshold)  # rows already best first
        lose = np.flatnonzero(dup_of >= 0)
        lose_rows.append(a + lose)
        winners.append(a + dup_of[lose])
        values.append(cos[lose])
    lose_rows, winners = np.concatenate(lose_rows), np.concatenate(winners)
    out = pa.table(
        {
            "shard": t.column("shard").take(pa.array(lose_rows)),
            "row": t.column("row").take(pa.array(lose_rows)),
            "winner_key": t.column("key").take(pa.array(winners)),
            "value": pa.array(np.concatenate(values), pa.float64()),
        },
        schema=LOSERS_SCHEMA,
    )
    return out.sort_by([("shard", "ascending"), ("row", "ascending")])


def losers_of(shard: int, tables: list[pa.Table]) -> pa.Table:
    """The rows of ``shard`` in reducer outputs (each sorted by shard)."""
    parts = []
    for t in tables:
        if not t.num_rows:
            continue
        s = t.column("shard").to_numpy()
        a, b = np.searchsorted(s, [shard, shard + 1])
        if b > a:
            parts.append(t.slice(a, b - a))
    return pa.concat_tables(parts) if parts else LOSERS_SCHEMA.empty_table()
