"""The faiss lookups behind copy detection (``tasks.curate.copydetect``): exact for a small eval set,
approximate (an inverted file of 8-bit codes) for a large one.

The variant lookup holds :data:`copydetect.VARIANT_CUTS` crops of every eval image (81 descriptors of 192
values a row), so a flat search costs 81 x 192 multiply-adds per eval image for every pool row: at 20,000
eval images that is tens of milliseconds a row, and 62 KB an eval image in every worker process. From
:data:`APPROX_FROM` indexed descriptors on, the lookup is an ``IndexIVFScalarQuantizer``: descriptors
clustered into about sqrt(n) lists (k-means on a seeded sample, so every worker process builds the same
index), :data:`PROBE` lists searched per query, and each descriptor stored as 192 bytes (one per value, 4x
smaller than float32; the distances it gives differ from the exact ones by far less than
``copydetect.CANDIDATE_RADIUS``). A near copy's descriptor lies within that radius of its variant, so it sits
in the variant's list or a neighbouring one; ``bench/decontam_scale.py`` measures the recall of near copies
against the flat lookup and the cost per row at several eval-set sizes (BENCHMARKS.md, Decontamination).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

DIM = 3 * 64  # an 8x8 colour descriptor
APPROX_FROM = 100_000  # indexed descriptors (about 1,230 eval images x 81 variants) from which to approximate
PROBE = 24  # inverted lists searched per query
TRAIN_PER_LIST = 64  # k-means sample: descriptors per inverted list
SEED = 0


def lists_for(n: int) -> int:
    """Inverted lists for ``n`` descriptors: about sqrt(n), so a probe scans a few thousand of them."""
    return int(np.clip(round(np.sqrt(n)), 16, 8192))


def build_lookup(
    rows: int,
    per_row: int,
    chunks: Callable[[np.ndarray | None], Iterator[np.ndarray]],
    approximate: bool | None = None,
):
    """A faiss index of the ``per_row`` descriptors of each of ``rows`` eval images, index row i the i-th
    descriptor that ``chunks(None)`` yields (float32 [m, DIM] arrays, in order); ``chunks(eval_rows)`` yields
    only the descriptors of those eval rows (a sample to train on). ``approximate``: None decides by
    :data:`APPROX_FROM`. The descriptors are never all held at once: a 20,000-image eval set has 1.6M of them
    (1.2 GB as float32)."""
    import faiss

    n = rows * per_row
    if approximate is None:
        approximate = n >= APPROX_FROM
    if not approximate or n < TRAIN_PER_LIST * lists_for(n):  # too few descriptors to cluster: exact
        index = faiss.IndexFlatL2(DIM)
    else:
        nlist = lists_for(n)
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatL2(DIM), DIM, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2
        )
        index.cp.seed = SEED
        sample = _sample_rows(rows, -(-TRAIN_PER_LIST * nlist // per_row))
        index.train(np.ascontiguousarray(np.concatenate(list(chunks(sample)))))
        index.nprobe = min(PROBE, nlist)
    for block in chunks(None):
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def _sample_rows(rows: int, want: int) -> np.ndarray:
    """A seeded sample of ``want`` of ``rows`` eval rows, in order (all of them when there are fewer)."""
    if want >= rows:
        return np.arange(rows)
    return np.sort(np.random.default_rng(SEED).choice(rows, size=want, replace=False))
