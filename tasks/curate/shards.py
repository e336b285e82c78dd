"""One raw shard as the curate passes read it: its metadata rows joined with the score cache.

Every pass re-reads what it needs from storage (parquet columns are cheap to read again) instead of holding the
pool anywhere: a task sees one shard at a time, the driver none. Inputs that cannot be curated raise
:class:`CurationInputError` naming the shard: a missing shard file, a shard without img2dataset's columns, or a
score cache that does not belong to the shard or the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlforge import storage
from vlforge.errors import VlforgeError

# img2dataset's own columns; anything else in a raw shard (e.g. truth_matched, LAION's columns) is carried.
RAW_COLUMNS = {
    "url", "caption", "key", "status", "error_message", "width", "height", "original_width",
    "original_height", "exif", "sha256", "jpg", "md5",
}  # fmt: skip
REQUIRED = ("key", "status")
NOT_READ = ("jpg", "exif")  # image bytes are read only for kept rows, by the writer
SCORER_KEY_META = b"vlforge.scorer_key"


class CurationInputError(VlforgeError):
    """A raw shard or score cache that cannot be curated (missing, malformed, from another scorer)."""


@dataclass(frozen=True)
class ShardRef:
    """What a Ray task needs to find one shard: its place in the pool and its files."""

    index: int  # position in the pool (raw batches sorted, shards sorted): the global order
    batch: str
    uri: str
    cache_uri: str | None  # score cache file; None when curating without a scorer
    scorer_key: str | None = None


def read_parquet(uri: str, columns: list[str] | None = None, what: str = "raw shard") -> pa.Table:
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=columns)
    except FileNotFoundError as exc:
        raise CurationInputError(
            f"{what} {uri} is missing (listed when the curation started); re-ingest the batch or restore the file"
        ) from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise CurationInputError(f"{what} {uri} cannot be read as parquet: {exc}") from exc


def read_schema(uri: str) -> pa.Schema:
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            return pq.read_schema(fh)
    except FileNotFoundError as exc:
        raise CurationInputError(
            f"raw shard {uri} is missing; re-ingest the batch or restore the file"
        ) from exc


def _cache_positions(keys: pa.ChunkedArray, cache_keys: pa.Array) -> np.ndarray:
    """For each raw row, its row in the cache (-1 where it has none)."""
    pos = pc.index_in(keys, value_set=cache_keys)
    return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _check_cache(shard: ShardRef, cache: pa.Table, status_ok: np.ndarray, pos: np.ndarray) -> None:
    meta = cache.schema.metadata or {}
    key = meta.get(SCORER_KEY_META)
    if key is not None and shard.scorer_key and key.decode() != shard.scorer_key:
        raise CurationInputError(
            f"score cache {shard.cache_uri} was written by scorer {key.decode()!r}, not {shard.scorer_key!r}; "
            "delete it to score the shard again"
        )
    missing = int((status_ok & (pos < 0)).sum())
    if missing:
        raise CurationInputError(
            f"score cache {shard.cache_uri} has no scores for {missing} downloaded rows of raw shard {shard.uri} "
            "(it belongs to another shard or an older copy); delete it to score the shard again"
        )


@dataclass
class ShardRows:
    """One shard's metadata (no image bytes) plus ``clip_score``/``decode_ok`` when scored."""

    table: pa.Table  # + decode_ok when scored
    scores: np.ndarray | None  # [N] float32, NaN where unscored
    cache_rows: np.ndarray | None  # [N] int64: row of each raw row in the cache, -1 where none


def read_shard(shard: ShardRef, columns: list[str] | None = None) -> ShardRows:
    """The shard's rows (all columns but image bytes, or ``columns``) joined with its score cache."""
    schema = read_schema(shard.uri)
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise CurationInputError(
            f"raw shard {shard.uri} lacks img2dataset's column(s) {missing}: it is not an ingested shard"
        )
    names = [c for c in schema.names if c not in NOT_READ] if columns is None else columns
    table = read_parquet(shard.uri, [c for c in dict.fromkeys([*REQUIRED, *names]) if c in schema.names])
    if shard.cache_uri is None:
        return ShardRows(table, None, None)
    cache = read_parquet(shard.cache_uri, ["key", "clip_score", "decode_ok"], what="score cache")
    pos = _cache_positions(table.column("key"), cache.column("key").combine_chunks())
    ok = pc.fill_null(pc.equal(table.column("status"), "success"), False).to_numpy(zero_copy_only=False)
    _check_cache(shard, cache, ok, pos)
    has = pos >= 0
    scores = np.full(table.num_rows, np.nan, dtype=np.float32)
    scores[has] = cache.column("clip_score").to_numpy(zero_copy_only=False)[pos[has]]
    decode = cache.column("decode_ok").to_numpy(zero_copy_only=False)
    decode_ok = pa.array(np.where(has, decode[np.maximum(pos, 0)], False), pa.bool_(), mask=~has)
    table = table.append_column("decode_ok", decode_ok)
    return ShardRows(table, scores, pos)


def read_embeddings(shard: ShardRef, cache_rows: np.ndarray, rows: np.ndarray, which: str = "img_emb"):
    """Float32 [len(rows), D] embeddings of the shard's ``rows`` from its score cache."""
    col = read_parquet(shard.cache_uri, [which], what="score cache").column(which).combine_chunks()
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return np.ascontiguousarray(flat[cache_rows[rows]], dtype=np.float32)


def schema_dict(table: pa.Table) -> dict[str, str]:
    """Column name -> type name, as manifests record a part's schema."""
    return {f.name: str(f.type) for f in table.schema}
