"""The distributed selection kernels without Ray: radix select against a sort, and the shuffle reducers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tasks.curate import select
from tasks.curate.filters import keep_top_fraction


def test_sortable_keys_keep_the_order_of_scores_negative_zero_and_nan_included():
    s = np.array([-1.0, -0.5, -1e-30, 0.0, 1e-30, 0.25, 0.2500001, 1.0, np.nan], dtype=np.float32)
    k = select.sortable_keys(s)
    assert (np.diff(k[:-1].astype(np.int64)) > 0).all() and k[-1] == 0
    assert [select.key_to_score(int(x)) for x in k[:-1]] == s[:-1].tolist()


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_radix_select_over_shards_keeps_the_rows_a_sort_keeps(fraction, seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(0.2, 0.1, 5000), 3).astype(np.float32)  # many ties
    shards = np.split(scores, [700, 701, 2600, 4000])  # uneven, one of a single row
    keys = [select.sortable_keys(s) for s in shards]
    hist = np.zeros(select.HIGH, np.int64)
    for k in keys:
        select.add_sparse(hist, select.high_histogram(k))
    eligible, n_keep, high_bin, above = select.cutoff_bin(hist, fraction)
    low = np.zeros(select.HIGH, np.int64)
    for k in keys:
        select.add_sparse(low, select.low_histogram(k, high_bin))
    key, above_in_bin = select.cutoff_key(low, high_bin, n_keep - above)
    quotas = select.tie_quotas([int((k == key).sum()) for k in keys], n_keep - above - above_in_bin)
    cut = select.Cutoff(key, fraction, eligible, n_keep)
    got = np.concatenate([select.in_top(k, cut, q) for k, q in zip(keys, quotas, strict=True)])
    want = keep_top_fraction(scores, np.ones(len(scores), bool), fraction).keep
    assert got.sum() == n_keep == np.ceil(fraction * len(scores))
    assert (got == want).all()


def _rows(**cols):
    n = len(next(iter(cols.values())))
    base = {"key": [f"k{i}" for i in range(n)], "shard": [0] * n, "row": list(range(n))}
    base.update(cols)
    return pa.table(
        {
            "key": pa.array(base["key"], pa.string()),
            "score": pa.array(base["score"], pa.float32()),
            "shard": pa.array(base["shard"], pa.int32()),
            "row": pa.array(base["row"], pa.int32()),
            **{c: base[c] for c in cols if c not in ("key", "score", "shard", "row")},
        }
    )


def test_exact_reducer_keeps_the_best_scored_copy_and_pool_order_breaks_ties():
    t = _rows(sha256=["a", "a", "b", "a", "b"], score=[0.1, 0.5, 0.2, 0.5, 0.2], shard=[0, 0, 0, 1, 1])
    # split over two map outputs, as the shuffle delivers them
    lost = select.exact_losers([t.slice(0, 3), t.slice(3)])
    got = {
        (s, r): w
        for s, r, w in zip(*(lost.column(c).to_pylist() for c in ("shard", "row", "winner_key")), strict=True)
    }
    assert got == {(0, 0): "k1", (1, 3): "k1", (1, 4): "k2"}


def test_near_reducer_compares_within_clusters_only():
    e = np.eye(3, dtype=np.float32)
    emb = np.stack([e[0], e[0] * 0.999 + e[1] * 0.04, e[2], e[0]])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    t = _rows(score=[0.3, 0.4, 0.2, 0.9], cluster=pa.array([0, 0, 0, 1], pa.int32()))
    t = t.append_column("emb", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 3))
    lost = select.near_losers([t], 0.95)
    # row 0 is a near copy of the better-scored row 1; row 3 is identical to row 0 but in another cluster
    assert lost.column("row").to_pylist() == [0] and lost.column("winner_key").to_pylist() == ["k1"]
    assert lost.column("value").to_pylist()[0] > 0.95
