"""The driver of the curate passes: launches one Ray task per shard and pass, merges small aggregates.

Nothing here holds a row: scan results (counts, a schema, a histogram) are merged as they arrive; eligible
rows, shuffle partitions and reducer outputs stay in Ray's object store and travel between tasks as refs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tasks.curate import passes, select
from tasks.curate.filters import REASONS, FilterConfig
from tasks.curate.publish import (
    EXAMPLES_PER_SIDE,
    HIST_EDGES,
    WriteResult,
    extras_schema,
    load_done,
    write_shard,
)
from tasks.curate.shards import ShardRef
from vlforge.datasets import VersionWriter
from vlforge.errors import VlforgeError
from vlforge.settings import Settings

log = logging.getLogger(__name__)


class PublishError(VlforgeError):
    """Writing a version failed (full disk, lost storage): nothing was published."""


@dataclass
class CurationOutput:
    counts: dict[str, int]
    schema: dict[str, dict[str, str]]
    embedding_dim: int | None
    selection: dict
    nodes: int = 0  # Ray nodes that wrote parts
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pass
    hist_kept: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES) - 1, np.int64))
    hist_rejected: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES) - 1, np.int64))
    examples: list[dict] = field(default_factory=list)
    licenses: dict[str, int] = field(
        default_factory=dict
    )  # kept rows per licence value, when the source has one


def _raise_clear(exc: Exception, what: str) -> None:
    """Re-raise a Ray task's failure as the user error it carries, or a PublishError for storage failures."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if isinstance(cause, VlforgeError):
        raise type(cause)(str(cause)) from None
    if isinstance(cause, OSError):
        raise PublishError(f"{what} failed: {cause}; nothing was published (re-run to resume)") from None
    raise exc


def _completed(refs: list, what: str) -> Iterator:
    """Results of ``refs`` as they finish (any order). ``refs`` is emptied as they do: a reference held
    anywhere keeps its result in the driver's memory (Ray keeps small results with their owner), so a caller's
    list of every task's reference would hold every result read until the pass ends."""
    import ray

    while refs:
        done, refs[:] = ray.wait(refs, num_returns=len(refs), timeout=0.5)
        for ref in done:
            try:
                yield ray.get(ref)
            except Exception as exc:  # RayTaskError wraps ours
                _raise_clear(exc, what)


def _get(refs: list, what: str) -> list:
    import ray

    try:
        return ray.get(refs)
    except Exception as exc:
        _raise_clear(exc, what)


def _bar(total: int, desc: str, progress: bool | None):
    from tasks.curate.scoring import progress_line

    return progress_line(total, "shards", desc, progress)


def run_curation(
    shards: list[ShardRef],
    source: str,
    config: FilterConfig,
    writer: VersionWriter,
    settings: Settings,
    progress: bool | None = None,
    evals=None,
) -> CurationOutput:
    """``evals``: the eval sets' ``EvalIndex`` to decontaminate against (None: no decontamination)."""
    import ray

    from vlforge.raycluster import cluster_cpus, init_ray

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 2)
        log.debug("after %s: driver RSS %.0f MB", name, _rss_mb())

    init_ray(settings)
    lap("ray_start")
    cpus = cluster_cpus()
    top = config.top_fraction is not None
    scan = ray.remote(passes.scan).options(num_returns=2, scheduling_strategy="SPREAD")
    evals_ref = ray.put(evals) if evals is not None and evals.size else None  # one copy for every task
    launched = [scan.remote(s, config, top, evals_ref, writer.uri) for s in shards]
    elig = [e for _, e in launched]
    scanned = [r for r, _ in launched]
    del launched
    hist = np.zeros(select.HIGH, np.int64) if top else None
    # One result per distinct schema (the earliest shard's): most pools have one, so this stays small.
    by_schema: dict[bytes, passes.ScanResult] = {}
    eligible = 0
    with _bar(len(shards), "filtering", progress) as bar:
        for r in _completed(scanned, "filtering the pool"):
            if top:
                select.add_sparse(hist, r.hist)
                r.hist = None
            eligible += r.eligible
            key = r.schema.serialize().to_pybytes()
            if key not in by_schema or r.index < by_schema[key].index:
                by_schema[key] = r
            bar.advance()
    lap("filter")
    del scanned  # results read: let Ray free them
    pool_schema = passes.check_schemas(list(by_schema.values()), {s.index: s.uri for s in shards})
    del by_schema
    cutoff, quotas, selection = _top_fraction(shards, elig, hist, config)
    lap("top_fraction")
    survivors = cutoff.n_keep if cutoff else eligible
    # Once in the object store: every task reads the one copy (its quotas are a list over all shards).
    plan = ray.put(passes.Plan(config=config, cutoff=cutoff, quotas=quotas))
    exact_refs = _exact_dedup(shards, elig, plan, config, survivors, cpus)
    n_exact_lost = sum(_get([ray.remote(_rows).remote(r) for r in exact_refs], "exact dedup"))
    lap("exact_dedup")
    near_refs, clusters = _near_dedup(shards, elig, plan, config, survivors - n_exact_lost, cpus, exact_refs)
    ray.wait(near_refs, num_returns=len(near_refs), fetch_local=False)  # for the timing; nothing fetched
    lap("near_dedup")
    selection.update(
        {"eligible": eligible, "exact_dedup_partitions": len(exact_refs), "near_dup_clusters": clusters}
    )
    out = _write(
        shards,
        source,
        writer,
        extras_schema(pool_schema),
        elig,
        plan,
        exact_refs + near_refs,
        len(exact_refs),
        progress,
    )
    out.selection = selection
    lap("write")
    out.timings = timings
    log.info("curation passes (s): %s", timings)
    return out


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) for x in fh if x.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _rows(table) -> int:
    return table.num_rows


def _top_fraction(shards: list, elig: list, hist, config: FilterConfig):
    import ray

    if config.top_fraction is None:
        return None, [0] * len(shards), {}
    eligible, n_keep, high_bin, above = select.cutoff_bin(hist, config.top_fraction)
    if n_keep == 0:
        cut = select.Cutoff(0xFFFFFFFF, config.top_fraction, eligible, 0)
        return cut, [0] * len(shards), {"top_fraction_kept": 0}
    refine = ray.remote(passes.refine)
    low = np.zeros(select.HIGH, np.int64)
    refs = [refine.remote(s, e, high_bin) for s, e in zip(shards, elig, strict=True)]
    for h in _completed(refs, "the top-fraction cutoff"):
        select.add_sparse(low, h)
    key, above_in_bin = select.cutoff_key(low, high_bin, n_keep - above)
    needed = n_keep - above - above_in_bin
    tie_task = ray.remote(passes.ties)
    ties = _get(
        [tie_task.remote(s, e, key) for s, e in zip(shards, elig, strict=True)], "the top-fraction cutoff"
    )
    quotas = select.tie_quotas(ties, needed)
    cut = select.Cutoff(key, config.top_fraction, eligible, n_keep)
    return cut, quotas, {"top_fraction_kept": n_keep, "top_fraction_cutoff": cut.score}


def _exact_dedup(shards, elig, plan, config: FilterConfig, survivors: int, cpus: int) -> list:
    import ray

    if not config.exact_dedup or not shards:
        return []
    parts = passes.partitions(survivors, cpus)
    mapper = ray.remote(passes.dedup_map)
    mapped = [mapper.remote(s, e, plan, parts) for s, e in zip(shards, elig, strict=True)]
    reduce = ray.remote(lambda p, *outs: select.exact_losers([o.part(p) for o in outs]))
    return [reduce.remote(p, *mapped) for p in range(parts)]


def _near_dedup(shards, elig, plan, config: FilterConfig, survivors: int, cpus: int, exact_refs: list):
    import ray

    if config.near_dup_threshold is None or not shards or survivors == 0:
        return [], 0
    k = max(1, math.ceil(survivors / config.near_dup_cluster_rows))
    centroids = None
    if k > 1:
        rate = min(1.0, passes.NEAR_SAMPLE_PER_CLUSTER * k / survivors)
        sampler = ray.remote(passes.near_sample)
        samples = [sampler.remote(s, e, plan, rate, *exact_refs) for s, e in zip(shards, elig, strict=True)]
        centroids = ray.remote(passes.fit_centroids).remote(k, *samples)
    parts = passes.partitions(survivors, cpus) if k > 1 else 1
    mapper = ray.remote(passes.near_map)
    mapped = [
        mapper.remote(s, e, plan, parts, centroids, *exact_refs) for s, e in zip(shards, elig, strict=True)
    ]
    threshold = float(config.near_dup_threshold)
    reduce = ray.remote(lambda p, *outs: select.near_losers([o.part(p) for o in outs], threshold))
    return [reduce.remote(p, *mapped) for p in range(parts)], k


def _write(shards, source, writer, extras, elig, plan, reducer_refs: list, n_exact: int, progress):
    """The write pass over the shards not written yet (a resumed version keeps its finished ones)."""
    import ray

    merged = _Merge(writer)
    todo = []
    for s in shards:
        done = load_done(writer.uri, s.index)
        if done is not None:
            merged.add(done)
        else:
            todo.append(s)
    if len(todo) < len(shards):
        log.info(
            "%d of %d shards were written by an earlier run and are kept",
            len(shards) - len(todo),
            len(shards),
        )
    task = ray.remote(write_shard).options(scheduling_strategy="SPREAD")
    refs = [
        task.remote(s, writer.uri, source, extras, elig[s.index], plan, n_exact, *reducer_refs) for s in todo
    ]
    with _bar(len(shards), "publishing", progress) as bar:
        bar.advance(len(shards) - len(todo))
        for r in _completed(refs, f"writing version {writer.version} under {writer.uri}"):
            merged.add(r)  # and let it go: the driver keeps no shard's result, only the sums and part digests
            bar.advance()
    return merged.output()


class _Merge:
    """The shards' write results added up as they arrive, in any order, to what the same results give in
    shard order: counts, licences and histograms summed, the part digests handed to the writer (the
    manifest's content hash), the first shard's schema of each part, the first shards' examples."""

    def __init__(self, writer: VersionWriter):
        self.writer = writer
        counts = {"input": 0, "kept": 0, "rejected": 0, **dict.fromkeys(REASONS, 0)}
        self.out = CurationOutput(counts, {}, None, {})
        self.schema_from: dict[str, int] = {}  # part -> the shard its schema came from
        self.examples: dict[int, list[dict]] = {}
        self.nodes: set[str] = set()

    def add(self, r: WriteResult) -> None:
        out = self.out
        self.nodes.add(r.node)
        for k, v in r.counts.items():
            out.counts[k] = out.counts.get(k, 0) + int(v)
        for relpath, digest in r.digests.items():
            self.writer.add_part(relpath.split("/", 1)[0], relpath, digest)
        for value, n in r.licenses.items():
            out.licenses[value] = out.licenses.get(value, 0) + int(n)
        for part, sch in r.schema.items():
            if r.index < self.schema_from.get(part, r.index + 1):
                out.schema[part], self.schema_from[part] = sch, r.index
        out.hist_kept += np.asarray(r.hist_kept, np.int64)
        out.hist_rejected += np.asarray(r.hist_rejected, np.int64)
        if r.examples:
            self.examples[r.index] = r.examples

    def output(self) -> CurationOutput:
        out = self.out
        ordered = [e for i in sorted(self.examples) for e in self.examples[i]]
        kept, rejected = [e for e in ordered if e["kept"]], [e for e in ordered if not e["kept"]]
        out.examples = kept[:EXAMPLES_PER_SIDE] + rejected[:EXAMPLES_PER_SIDE]
        out.nodes = len(self.nodes - {""})
        return out
