"""Assemble and write a curated dataset version: ``data/``, ``rejected/``, ``embeddings/`` (clip-retrieval layout).

Pass 1 (:func:`load_candidates`) reads every raw shard *without* image bytes and joins the cached CLIP scores
and embeddings, so the filters see the whole pool (top fraction, dedup) in little memory. Pass 2
(:func:`write_version_parts`) streams shard by shard, reading image bytes only for kept rows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.filters import Decisions
from tasks.scoring import Shard, read_scores
from vlforge import storage
from vlforge.datasets import VersionWriter

# img2dataset's own columns; anything else in a raw shard (e.g. truth_matched) is carried through.
RAW_COLUMNS = {
    "url", "caption", "key", "status", "error_message", "width", "height", "original_width",
    "original_height", "exif", "sha256", "jpg", "md5",
}  # fmt: skip
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
]


@dataclass
class Candidates:
    table: (
        pa.Table
    )  # one row per raw row, no image bytes; + raw_batch, shard_index, row_index, clip_score, decode_ok
    img_emb: np.ndarray | None  # [N, D] float32, zeros where unscored
    text_emb: np.ndarray | None
    extras: list[str]


def _read(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def _schema_names(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as fh:
        return pq.read_schema(fh).names


def load_candidates(shards: list[Shard], source: str, scored: bool) -> Candidates:
    tables, imgs, txts, extras = [], [], [], []
    for si, s in enumerate(shards):
        names = [c for c in _schema_names(s.uri) if c not in ("jpg", "exif")]
        extras += [c for c in names if c not in RAW_COLUMNS and c not in extras]
        t = _read(s.uri, names)
        n = t.num_rows
        t = t.append_column("source", pa.array([source] * n, pa.string()))
        t = t.append_column("raw_batch", pa.array([s.batch] * n, pa.string()))
        t = t.append_column("shard_index", pa.array([si] * n, pa.int32()))
        t = t.append_column("row_index", pa.array(np.arange(n), pa.int32()))
        score = np.full(n, np.nan, dtype=np.float32)
        decode_ok = [None] * n
        if scored:
            cache = read_scores(s.cache_uri)
            pos = {k: i for i, k in enumerate(t.column("key").to_pylist())}
            rows = np.array([pos[k] for k in cache.column("key").to_pylist()], dtype=np.int64)
            dim = cache.schema.field("img_emb").type.list_size
            img, txt = np.zeros((n, dim), np.float32), np.zeros((n, dim), np.float32)
            if len(rows):
                score[rows] = cache.column("clip_score").to_numpy(zero_copy_only=False)
                for r, ok in zip(rows, cache.column("decode_ok").to_pylist(), strict=True):
                    decode_ok[r] = ok
                img[rows] = np.stack(cache.column("img_emb").to_numpy(zero_copy_only=False))
                txt[rows] = np.stack(cache.column("text_emb").to_numpy(zero_copy_only=False))
            imgs.append(img)
            txts.append(txt)
        t = t.append_column("clip_score", pa.array(score, pa.float32(), from_pandas=True))
        t = t.append_column("decode_ok", pa.array(decode_ok, pa.bool_()))
        tables.append(t)
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    return Candidates(
        table,
        np.concatenate(imgs) if imgs else None,
        np.concatenate(txts) if txts else None,
        extras,
    )


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _cols(table: pa.Table, names: list[str]) -> list[str]:
    return [c for c in names if c in table.column_names]


def write_version_parts(
    writer: VersionWriter, shards: list[Shard], cand: Candidates, dec: Decisions
) -> dict[str, object]:
    """Write data/, embeddings/ (kept rows, row-aligned) and rejected/; returns the parts' schema."""
    t = cand.table
    shard_idx = t.column("shard_index").to_numpy()
    row_idx = t.column("row_index").to_numpy()
    schema: dict[str, object] = {}
    part = 0
    for si, s in enumerate(shards):
        sel = np.flatnonzero((shard_idx == si) & dec.keep)
        if not len(sel):
            continue
        images = _read(s.uri, ["jpg"]).column("jpg").take(pa.array(row_idx[sel]))
        meta = t.take(pa.array(sel))
        cols = {c: meta.column(c) for c in _cols(meta, DATA_COLUMNS)}
        cols["image"] = images.cast(pa.binary())
        data = pa.table(
            {c: cols[c] for c in DATA_COLUMNS if c in cols} | {e: meta.column(e) for e in cand.extras}
        )
        writer.write_table("data", data, index=part)
        schema["data"] = {f.name: str(f.type) for f in data.schema}
        if cand.img_emb is not None:
            writer.write_bytes(
                f"embeddings/img_emb/img_emb_{part:05d}.npy", _npy(cand.img_emb[sel].astype(np.float16))
            )
            writer.write_bytes(
                f"embeddings/text_emb/text_emb_{part:05d}.npy", _npy(cand.text_emb[sel].astype(np.float16))
            )
            md = data.select(_cols(data, ["key", "url", "caption", "clip_score", "sha256", "raw_batch"]))
            buf = io.BytesIO()
            pq.write_table(md, buf)
            writer.write_bytes(f"embeddings/metadata/metadata_{part:05d}.parquet", buf.getvalue())
        part += 1
    rejected_rows = np.flatnonzero(~dec.keep)
    if len(rejected_rows):
        rej = t.take(pa.array(rejected_rows))
        keep_cols = _cols(rej, [*DATA_COLUMNS, "status", "error_message", "decode_ok"]) + cand.extras
        rej = rej.select([c for c in keep_cols if c != "image"])
        rej = rej.append_column("reason", pa.array([dec.reason[i] for i in rejected_rows], pa.string()))
        rej = rej.append_column(
            "reason_value", pa.array([dec.reason_value[i] for i in rejected_rows], pa.float64())
        )
        rej = rej.append_column(
            "reason_detail", pa.array([dec.reason_detail[i] for i in rejected_rows], pa.string())
        )
        writer.write_table("rejected", rej, index=0)
        schema["rejected"] = {f.name: str(f.type) for f in rej.schema}
    return schema
