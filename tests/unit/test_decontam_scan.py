"""Decontamination's scan (tasks.curate.passes.scan) sends nothing per row back to the driver: Ray keeps a small
task result in the driver's own memory, so per-row labels returned there would grow the driver with the pool.
The scan leaves its verdicts beside the staged version, and the write pass reads them from there."""

from __future__ import annotations

import pickle

import numpy as np

from tasks.curate import passes
from tasks.curate.filters import CONTAMINATED, FilterConfig
from tasks.curate.publish import decide
from tasks.curate.shards import ShardRef
from tests.unit.test_copydetect_index import _index
from vlforge import storage
from vlforge.demo.datasets import write_raw_batch
from vlforge.demo.synth import make_shape_pairs


def _scan(settings, n_copies: int, version_uri: str):
    evals = make_shape_pairs(12, seed=71, prefix="ev")
    distinct = make_shape_pairs(24 - n_copies, seed=72, prefix="px")
    raw = write_raw_batch(settings, f"web{n_copies}", "b1", evals[:n_copies] + distinct, shard_size=24)
    shard = ShardRef(0, "b1", storage.join(raw, "00000.parquet"), None)
    return shard, passes.scan(shard, FilterConfig(), False, _index([p.image for p in evals]), version_uri)


def test_scan_result_carries_no_per_row_verdicts(settings, tmp_path):
    staged = str(tmp_path / "staged")
    _, (_, none) = _scan(settings, 0, staged)
    shard, (res, some) = _scan(settings, 12, staged)
    assert none.contaminated == 0 and some.contaminated == 12
    assert res.eligible == 12
    # Same size whether 0 or 12 of the 24 rows are contaminated: the bitmap and a count, nothing per row.
    assert len(pickle.dumps(some)) == len(pickle.dumps(none))

    # The write pass finds the verdicts in the staged version: the rows, the copy distance, the eval row.
    rows = passes.read_shard(shard)
    dec = decide(shard, rows, FilterConfig(), some, None, 0, [], [], staged)
    dropped = np.flatnonzero(~dec.keep)
    assert dropped.tolist() == list(range(12))
    assert set(dec.reasons[dropped]) == {CONTAMINATED}
    assert all(d.startswith("near copy of eval image ev@1 key e") for d in dec.details[dropped])
    assert np.all(dec.values[dropped] <= 1.0)
