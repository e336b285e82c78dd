"""``ingest --retry-failed``: for a batch already ingested, fetch again only the rows that ended in a transient
failure (timeouts, connection errors, 5xx, ``rate_limited``, ``robots_unavailable``; ``accounting.is_transient``),
never the ones refused on purpose (robots, opt-out, TDM, blocklist, the network guard) nor images that failed
for what they are (too small, undecodable).

The rows go through the same checks as at staging (opt-out lists, guard, robots.txt and tdmrep.json read again)
and are downloaded by img2dataset into ``<batch>/_retry/out/``; then, journalled in ``_retry/MERGE.json`` so that
a killed run finishes the merge on its next ``--retry-failed``:

1. the new shards (and their stats) move into the batch after its last shard id;
2. the old shards are rewritten without the rows that now live in the new shards;
3. the batch's ``_SUCCESS`` summary is rewritten with the new counts (every list row still exactly once).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.ingest import accounting as acc
from tasks.ingest.staging import INPUT, REFUSED, SITES, RowCheck, StagedList
from vlforge import storage

RETRY = "_retry"
MERGE = "MERGE.json"
_OUTPUT_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width", "original_height")


def _shards(batch: str) -> list[str]:
    return sorted(
        u
        for u in storage.glob(storage.join(batch, "*.parquet"))
        if u.rsplit("/", 1)[-1].split(".")[0].isdigit()
    )


def _read(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def transient_rows(batch: str) -> pa.Table | None:
    """The input columns (extras, ROW_COL, caption, url) of the batch's rows that failed transiently."""
    picked = []
    for shard in _shards(batch):
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
        inputs = names[: names.index("key")]
        table = _read(shard, [*inputs, "status", "error_message"])
        why = [acc.reason(s, m) for s, m in zip(table.column("status").to_pylist(),
                                                 table.column("error_message").to_pylist(), strict=True)]  # fmt: skip
        mask = pa.array([acc.is_transient(w) for w in why], pa.bool_())
        if pc.any(mask).as_py():
            picked.append(table.filter(mask).select(inputs))
    if not picked:
        return None
    table = pa.concat_tables(picked, promote_options="permissive")
    extras = [c for c in table.column_names if c not in ("caption", "url", acc.ROW_COL)]
    return table.select([*extras, acc.ROW_COL, "caption", "url"])


def stage_rows(rows: pa.Table, uri: str, check: RowCheck, delays: dict[str, float]) -> StagedList:
    """Stage ``rows`` for img2dataset in ``uri`` after the same checks as a list's staging."""
    storage.remove(uri)
    reasons = check.refusals(rows.column("url").to_pylist())
    refused = np.array([r is not None for r in reasons], dtype=bool)
    messages = pa.array([acc.REFUSED_PREFIX + r for r in reasons if r is not None], pa.string())
    refused_rows = rows.filter(pa.array(refused)).append_column("error_message", messages)
    allowed = rows.filter(pa.array(~refused))
    for name, table in ((REFUSED, refused_rows), (INPUT, allowed)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(storage.join(uri, name), buf.getvalue())
    storage.write_json_atomic(storage.join(uri, SITES), {"crawl_delays": delays})
    extras = [c for c in rows.column_names if c not in ("url", "caption")]
    return StagedList(uri, rows.num_rows, allowed.num_rows, extras, delays)


def plan_merge(batch: str, out: str) -> dict:
    """Write the merge journal: which new shard goes to which id in the batch."""
    first = max((int(u.rsplit("/", 1)[-1].split(".")[0]) for u in _shards(batch)), default=-1) + 1
    moves = {
        u.rsplit("/", 1)[-1].split(".")[0]: acc.shard_name(first + i) for i, u in enumerate(_shards(out))
    }
    journal = {"out": out, "moves": moves}
    storage.write_json_atomic(storage.join(batch, RETRY, MERGE), journal)
    return journal


def finish_merge(batch: str) -> bool:
    """Carry out a journalled merge (idempotent); False when there is none."""
    uri = storage.join(batch, RETRY, MERGE)
    if not storage.exists(uri):
        return False
    journal = storage.read_json(uri)
    out, moves = journal["out"], journal["moves"]
    for old, new in moves.items():
        for suffix in (".parquet", "_stats.json"):
            src = storage.join(out, old + suffix)
            if storage.exists(src):
                storage.write_bytes_atomic(storage.join(batch, new + suffix), storage.read_bytes(src))
                storage.remove(src)
    new_names = set(moves.values())
    retried = [
        _read(storage.join(batch, f"{n}.parquet"), [acc.ROW_COL]).column(acc.ROW_COL) for n in new_names
    ]
    ids = pa.chunked_array([c for t in retried for c in t.chunks], pa.int64())
    for shard in _shards(batch):
        name = shard.rsplit("/", 1)[-1].split(".")[0]
        if name not in new_names:
            _drop_rows(shard, ids)
    storage.remove(storage.join(batch, RETRY))
    return True


def _drop_rows(shard: str, ids: pa.ChunkedArray) -> None:
    """Rewrite ``shard`` without the rows whose ROW_COL is in ``ids`` (failed rows: no image bytes)."""
    table = _read(shard)
    keep = pc.invert(pc.is_in(table.column(acc.ROW_COL), value_set=ids))
    dropped = table.num_rows - pc.sum(keep.cast(pa.int64())).as_py()
    if not dropped:
        return
    buf = io.BytesIO()
    pq.write_table(table.filter(keep), buf)
    storage.write_bytes_atomic(shard, buf.getvalue())
    stats_uri = shard[: -len(".parquet")] + "_stats.json"
    if storage.exists(stats_uri):
        stats = storage.read_json(stats_uri)
        stats["count"] = int(stats.get("count", 0)) - dropped
        stats["failed_to_download"] = max(0, int(stats.get("failed_to_download", 0)) - dropped)
        stats["retried_elsewhere"] = int(stats.get("retried_elsewhere", 0)) + dropped
        storage.write_bytes_atomic(stats_uri, json.dumps(stats).encode())
