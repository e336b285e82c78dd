"""Decontamination: pool rows that copy an eval set's images are dropped with reason ``contaminated``.

``vlforge curate --decontaminate-against NAME[@VERSION]`` (repeatable) names the eval sets; by default every
dataset whose newest version is marked an eval set (``vlforge curate --eval-set``, manifest ``eval_set: true``)
other than the one being curated; ``none`` turns it off. The eval versions' images are fingerprinted once in
the driver (eval sets are small: 12 KB a row) into an :class:`~tasks.curate.copydetect.EvalIndex` that goes to
every scan task through the object store (each worker process builds its crop-variant lookup from it once:
``copydetect``); each task decodes its shard's rows and runs
:func:`keep_uncontaminated` (a filter: ``keep(batch) -> Verdict``) on the rows the per-row filters kept. The
contaminated rows come back as per-shard metadata (their positions and the eval row each copies), so the
driver's memory does not grow with the pool.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.curate.copydetect import CopyMatcher, EvalIndex
from tasks.curate.filters import CONTAMINATED, Verdict
from tasks.curate.shards import read_parquet
from vlforge import storage
from vlforge.errors import VlforgeError
from vlforge.hfformat import encoded_images
from vlforge.imagehash import fingerprint

NONE = "none"
__all__ = ["CONTAMINATED", "build_index", "eval_set_refs", "keep_uncontaminated"]


class DecontaminationError(VlforgeError):
    """An eval set to decontaminate against that does not exist or has no images."""


def eval_set_refs(settings, against: list[str] | None, dataset: str) -> list[str]:
    """The eval-set versions (``NAME@VERSION``) to decontaminate a new version of ``dataset`` against."""
    from vlforge.datasets import DatasetNotFoundError, list_datasets, resolve_dataset

    if against and [a.lower() for a in against] == [NONE]:
        return []
    if against:
        refs = []
        for name in against:
            try:
                refs.append(resolve_dataset(settings, name).ref)
            except DatasetNotFoundError as exc:
                raise DecontaminationError(
                    f"--decontaminate-against {name}: {exc}; curate the eval set first (with --eval-set)"
                ) from None
        return list(dict.fromkeys(refs))
    refs = []
    for name in list_datasets(settings):
        if name == dataset:
            continue
        try:
            dv = resolve_dataset(settings, name)
        except DatasetNotFoundError:
            continue
        if dv.manifest.get("eval_set"):
            refs.append(dv.ref)
    return refs


def build_index(settings, refs: list[str]) -> EvalIndex:
    """Fingerprints of every image of the eval versions ``refs``, read file by file."""
    from vlforge.datasets import resolve_dataset

    labels, keys, hashes, canons = [], [], [], []
    for ref in refs:
        dv = resolve_dataset(settings, ref)
        for f in dv.part_files("data"):
            table = read_parquet(f, ["key", "image"], what=f"eval set {ref} file")
            for key, data in zip(
                table.column("key").to_pylist(),
                encoded_images(table.column("image")).to_pylist(),
                strict=True,
            ):
                fp = fingerprint(data) if data is not None else None
                if fp is None:
                    continue
                labels.append(ref)
                keys.append(str(key))
                hashes.append(fp[0])
                canons.append(fp[1])
    canon = np.stack(canons) if canons else np.zeros((0, 64, 64, 3), np.uint8)
    return EvalIndex(labels, keys, np.array(hashes, np.int64), canon)


def keep_uncontaminated(images: list[bytes | None], matcher: CopyMatcher, rows: np.ndarray) -> Verdict:
    """Among ``rows`` (positions into ``images``, encoded bytes), drop those that copy an eval image. The
    value is the copy distance (at most 1: see ``copydetect.copy_distance``); the detail names the eval row."""
    n = len(images)
    fps = [fingerprint(images[i]) if images[i] is not None else None for i in rows]
    found, dist = matcher.match([f[0] if f else None for f in fps], [f[1] if f else None for f in fps])
    keep = np.ones(n, dtype=bool)
    values = np.full(n, np.nan)
    match = np.full(n, -1, np.int64)
    hit = found >= 0
    keep[rows[hit]] = False
    values[rows[hit]] = dist[hit]
    match[rows[hit]] = found[hit]
    index = matcher.index
    return Verdict(
        keep,
        CONTAMINATED,
        values,
        lambda i: f"near copy of eval image {index.label(int(match[i]))} (copy distance {values[i]:.2f})",
    )


def contamination_uri(version_uri: str, index: int) -> str:
    """Where the scan of shard ``index`` leaves its contaminated rows for the write pass: in the version's
    ``_parts/`` folder, removed once the version is published."""
    return storage.join(version_uri, "_parts", f"contaminated-{index:05d}.parquet")


def save_contamination(uri: str, verdict: Verdict) -> int:
    """The rows ``verdict`` drops (position, copy distance, the detail naming the eval row), written to ``uri``
    beside the shard's staged output; returns their count. They stay out of the scan's Ray result: Ray keeps a
    small result in the driver's own memory, so labels returned that way would grow the driver with the pool."""
    rows = np.flatnonzero(~verdict.keep)
    table = pa.table(
        {
            "row": pa.array(rows, pa.int32()),
            "value": pa.array(verdict.values[rows], pa.float64()),
            "detail": pa.array([verdict.detail(int(i)) for i in rows], pa.string()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    return len(rows)


def load_contamination(uri: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The rows ``save_contamination`` wrote: positions, copy distances and details."""
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))  # missing: the write pass fails, re-run
    rows = table.column("row").to_numpy().astype(np.int64)
    return rows, table.column("value").to_numpy(), table.column("detail").to_pylist()


def shard_images(uri: str) -> list[bytes | None]:
    return read_parquet(uri, ["jpg"]).column("jpg").cast(pa.binary()).to_pylist()
