"""The write pass: one Ray task per raw shard applies every decision and writes that shard's parts.

``data/part-NNNNN.parquet`` (kept rows; ``image`` in ``datasets``' Image layout, see ``vlforge.hfformat``),
``embeddings/{img_emb,text_emb}/*_NNNNN.npy`` and ``embeddings/metadata/metadata_NNNNN.parquet``
(clip-retrieval's layout, row-aligned with ``data``), and
``rejected/part-NNNNN.parquet`` (dropped rows, no image bytes, with ``reason``, ``reason_value`` and
``reason_detail``), where NNNNN is the shard's place in the pool. Each part is written atomically and the
shard's ``_parts/NNNNN.json`` (counts, digests, schema) last, so a resumed run skips finished shards. The
task returns aggregates only: counts per reason, a score histogram, and a few examples from the first shards.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.curate import select
from tasks.curate.filters import (
    DOWNLOAD_FAILED,
    DUPLICATE,
    NEAR_DUPLICATE,
    OUTSIDE_TOP_FRACTION,
    Decisions,
    FilterConfig,
    Verdict,
    row_filters,
    top_fraction_detail,
)
from tasks.curate.shards import RAW_COLUMNS, ShardRef, read_embeddings, read_parquet, read_shard, schema_dict
from tasks.ingest.accounting import ROW_COL
from vlforge import storage
from vlforge.hfformat import image_struct, with_hf_features
from vlforge.imagehash import phash_bytes

DATA_COLUMNS = [
    "key",
    "url",
    "caption",
    "image",
    "width",
    "height",
    "sha256",
    "clip_score",
    "source",
    "raw_batch",
    "phash",  # the image's perceptual hash (vlforge.imagehash): the held-out split reads it
]
REJECTED_EXTRA = ["status", "error_message", "decode_ok"]
# Ingest's bookkeeping (the row's place in its URL list): kept in rejected/ to trace a drop back to its list
# line, never in data/.
NOT_PUBLISHED = {ROW_COL}
LICENCE_COLUMNS = ("license", "licence")
HIST_EDGES = np.linspace(-1.0, 1.0, 201)  # CLIP cosines; the report plots the populated range
EXAMPLE_SHARDS = 4  # only the first shards send example images to the driver
EXAMPLES_PER_SIDE = 4
DONE_DIR = "_parts"


@dataclass
class WriteResult:
    index: int
    counts: dict[str, int]
    digests: dict[str, str]  # relpath -> sha256
    schema: dict[str, dict[str, str]]
    hist_kept: list[int]
    hist_rejected: list[int]
    node: str = ""  # the Ray node that wrote the parts
    licenses: dict[str, int] = field(default_factory=dict)  # kept rows per value of the licence column
    examples: list[dict] = field(default_factory=list)  # {image, caption, verdict, score, kept}

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d.pop("examples")
        return d


def done_uri(version_uri: str, index: int) -> str:
    return storage.join(version_uri, DONE_DIR, f"{index:05d}.json")


def load_done(version_uri: str, index: int) -> WriteResult | None:
    uri = done_uri(version_uri, index)
    if not storage.exists(uri):
        return None
    return WriteResult(**storage.read_json(uri))


def _drop(n: int, rows: np.ndarray, reason: str, values=None, detail=lambda i: None) -> Verdict:
    keep = np.ones(n, dtype=bool)
    keep[rows] = False
    return Verdict(keep, reason, values, detail)


def decide(
    shard: ShardRef,
    rows,
    config: FilterConfig,
    elig,
    cutoff,
    quota: int,
    exact: list,
    near: list,
    version_uri: str,
) -> Decisions:
    """Every filter's decision for the shard's rows: per-row, top fraction, exact and near dedup."""
    n = rows.table.num_rows
    dec = row_filters(rows.table, config, rows.scores)
    if elig.contaminated:  # decided by the scan (tasks.curate.decontam), which left its verdicts beside us
        from tasks.curate.decontam import CONTAMINATED, contamination_uri, load_contamination

        r, found, details = load_contamination(contamination_uri(version_uri, shard.index))
        values = np.full(n, np.nan)
        values[r] = found
        detail = dict(zip(r.tolist(), details, strict=True))
        dec.merge(_drop(n, r, CONTAMINATED, values, lambda i, d=detail: d[i]))
    if cutoff is not None:
        s, candidates = rows.scores, elig.rows
        top = candidates[select.in_top(select.sortable_keys(s[candidates]), cutoff, quota)]
        out = np.setdiff1d(candidates, top)
        dec.merge(
            _drop(
                n,
                out,
                OUTSIDE_TOP_FRACTION,
                s,
                lambda i: top_fraction_detail(s[i], cutoff.fraction, cutoff.score),
            )
        )
    for reducer_out, reason in ((exact, DUPLICATE), (near, NEAR_DUPLICATE)):
        lost = select.losers_of(shard.index, reducer_out)
        if not lost.num_rows:
            continue
        r = lost.column("row").to_numpy().astype(np.int64)
        winner = dict(zip(r.tolist(), lost.column("winner_key").to_pylist(), strict=True))
        values = np.full(n, np.nan)
        values[r] = lost.column("value").to_numpy(zero_copy_only=False)
        if reason == DUPLICATE:
            dec.merge(_drop(n, r, reason, None, lambda i, w=winner: f"same sha256 as key {w[i]}"))
        else:
            t = config.near_dup_threshold
            dec.merge(
                _drop(
                    n,
                    r,
                    reason,
                    values,
                    lambda i, w=winner, v=values, t=t: f"image cosine {v[i]:.4f} > {t} with key {w[i]}",
                )
            )
    return dec


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _conform(table: pa.Table, extras: pa.Schema) -> pa.Table:
    """The pool's carried columns, in the pool's order and types (null where this shard lacks one)."""
    cols = {}
    for f in extras:
        col = table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        cols[f.name] = col.cast(f.type) if not pa.types.is_null(f.type) else col
    return pa.table(cols) if cols else pa.table({})


def _with_common(meta: pa.Table, shard: ShardRef, source: str, scores) -> dict[str, pa.Array]:
    n = meta.num_rows
    cols = {c: meta.column(c) for c in DATA_COLUMNS if c in meta.column_names}
    cols["source"] = pa.array([source] * n, pa.string())
    cols["raw_batch"] = pa.array([shard.batch] * n, pa.string())
    cols["clip_score"] = pa.array(scores, pa.float32(), from_pandas=True)
    return cols


def _ordered(cols: dict, names: list[str]) -> dict:
    return {c: cols[c] for c in names if c in cols}


def write_shard(
    shard: ShardRef,
    version_uri: str,
    source: str,
    extras: pa.Schema,
    elig,
    plan,
    n_exact: int,
    *reducer_outputs: pa.Table,
) -> WriteResult:
    """Decide and write one shard's parts (see the module docstring); returns its aggregates.

    ``plan``: ``passes.Plan`` (filters, top-fraction cutoff and quotas); ``reducer_outputs``: the exact dedup
    reducers' outputs (the first ``n_exact``), then the near dedup reducers'."""
    rows = read_shard(shard)
    exact, near = list(reducer_outputs[:n_exact]), list(reducer_outputs[n_exact:])
    quota = plan.quotas[shard.index] if plan.cutoff is not None else 0
    dec = decide(shard, rows, plan.config, elig, plan.cutoff, quota, exact, near, version_uri)
    table, n = rows.table, rows.table.num_rows
    scores = rows.scores if rows.scores is not None else np.full(n, np.nan, np.float32)
    # In key order (the row's place in its list), not the order img2dataset's threads finished downloading: the
    # same list gives the same parts, row for row, so a training seeded alike sees the same data alike.
    in_order = np.argsort(table.column("key").to_numpy(zero_copy_only=False).astype(str), kind="stable")
    kept, rejected = in_order[dec.keep[in_order]], in_order[~dec.keep[in_order]]
    files: dict[str, bytes] = {}
    schema: dict[str, dict[str, str]] = {}
    licenses: dict[str, int] = {}
    tag = f"{shard.index:05d}"
    if len(kept):
        meta = table.take(pa.array(kept))
        cols = _with_common(meta, shard, source, scores[kept])
        jpg = read_parquet(shard.uri, ["jpg"]).column("jpg").take(pa.array(kept))
        cols["image"] = image_struct(jpg)  # datasets' Image layout: load_dataset decodes it
        # Never null (an undecodable image, kept without a scorer, gets 0): a Ray Data batch turns an int64
        # column with nulls into float64, which would round the hash the split reads.
        cols["phash"] = pa.array([(phash_bytes(b) if b else None) or 0 for b in jpg.to_pylist()], pa.int64())
        data = pa.table(_ordered(cols, DATA_COLUMNS))
        conformed = _conform(meta, extras)
        for f in conformed.schema:
            if f.name not in NOT_PUBLISHED:
                data = data.append_column(f.name, conformed.column(f.name))
        files[f"data/part-{tag}.parquet"] = _parquet(with_hf_features(data))
        schema["data"] = schema_dict(data)
        licenses = licence_counts(data)
        if rows.cache_rows is not None:
            for which in ("img_emb", "text_emb"):
                emb = read_embeddings(shard, rows.cache_rows, kept, which)
                files[f"embeddings/{which}/{which}_{tag}.npy"] = _npy(emb.astype(np.float16))
            md = data.select(
                [
                    c
                    for c in ("key", "url", "caption", "clip_score", "sha256", "raw_batch")
                    if c in data.column_names
                ]
            )
            files[f"embeddings/metadata/metadata_{tag}.parquet"] = _parquet(md)
    if len(rejected):
        meta = table.take(pa.array(rejected))
        cols = _with_common(meta, shard, source, scores[rejected])
        cols.update({c: meta.column(c) for c in REJECTED_EXTRA if c in meta.column_names})
        rej = pa.table(_ordered(cols, [c for c in DATA_COLUMNS if c != "image"] + REJECTED_EXTRA))
        conformed = _conform(meta, extras)
        for f in conformed.schema:
            rej = rej.append_column(f.name, conformed.column(f.name))
        rej = rej.append_column("reason", pa.array(dec.reasons[rejected].tolist(), pa.string()))
        rej = rej.append_column(
            "reason_value", pa.array(dec.values[rejected], pa.float64(), from_pandas=True)
        )
        rej = rej.append_column("reason_detail", pa.array(dec.details[rejected].tolist(), pa.string()))
        files[f"rejected/part-{tag}.parquet"] = _parquet(rej)
        schema["rejected"] = schema_dict(rej)
    digests = {}
    for relpath, data in files.items():
        storage.write_bytes_atomic(storage.join(version_uri, relpath), data)
        digests[relpath] = hashlib.sha256(data).hexdigest()
    ok = ~np.isnan(scores)
    result = WriteResult(
        shard.index,
        {k: v for k, v in dec.counts().items() if v},
        digests,
        schema,
        np.histogram(scores[ok & dec.keep], HIST_EDGES)[0].tolist(),
        np.histogram(scores[ok & ~dec.keep], HIST_EDGES)[0].tolist(),
        licenses=licenses,
    )
    result.node = _node_id()
    storage.write_bytes_atomic(done_uri(version_uri, shard.index), json.dumps(result.to_json()).encode())
    if shard.index < EXAMPLE_SHARDS:
        result.examples = _examples(shard, table, scores, dec)
    return result


def licence_column(names: list[str]) -> str | None:
    """The source's licence column (``license``/``licence``, any case), if it carries one."""
    return next((n for n in names if n.lower() in LICENCE_COLUMNS), None)


def licence_counts(data: pa.Table) -> dict[str, int]:
    """Kept rows per licence value ({} when the source has no licence column; nulls count as "unknown")."""
    col = licence_column(data.column_names)
    if col is None:
        return {}
    values = data.column(col).cast(pa.string()).fill_null("unknown")
    counts = values.value_counts()
    return {v.as_py(): c.as_py() for v, c in zip(counts.field("values"), counts.field("counts"), strict=True)}


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or ""
    except Exception:  # outside Ray (a test calling the function directly)
        return ""


def _examples(shard: ShardRef, table: pa.Table, scores: np.ndarray, dec: Decisions) -> list[dict]:
    """The shard's first kept rows and first rejected rows that have an image, for the report's grid."""
    kept = np.flatnonzero(dec.keep)[:EXAMPLES_PER_SIDE]
    rej = [i for i in np.flatnonzero(~dec.keep) if dec.reasons[i] != DOWNLOAD_FAILED][:EXAMPLES_PER_SIDE]
    pick = [*kept.tolist(), *rej]
    if not pick:
        return []
    jpg = read_parquet(shard.uri, ["jpg"]).column("jpg")
    captions = table.column("caption") if "caption" in table.column_names else None
    return [
        {
            "image": jpg[i].as_py() or b"",
            "caption": (captions[i].as_py() if captions is not None else "") or "",
            "verdict": "kept" if dec.keep[i] else dec.reasons[i],
            "score": None if np.isnan(scores[i]) else float(scores[i]),
            "kept": bool(dec.keep[i]),
        }
        for i in pick
    ]


def extras_schema(pool: pa.Schema) -> pa.Schema:
    """The carried (non-img2dataset) columns of the pool, in order."""
    skip = RAW_COLUMNS | {"decode_ok"}
    return pa.schema([f for f in pool if f.name not in skip])
