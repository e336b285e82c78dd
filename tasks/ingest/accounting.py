"""Accounting for a raw batch: img2dataset's error messages normalised to short reasons, the extra shard that holds
the rows vlforge refused before download (in img2dataset's own schema), and the check that every input row of
the list appears exactly once in the batch.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlforge import netguard, storage

ROW_COL = "vlforge_row"  # position of the row in the URL list (0-based), carried through img2dataset
REFUSED_PREFIX = (
    netguard.REFUSED_PREFIX
)  # before download, or by the guard in a worker (inside urllib's text)
OOM_SHARD_COUNT = 5  # img2dataset's default: shard files are NNNNN.parquet
# Reasons of crawl compliance (logged as MLflow counts even when zero, so a run shows it looked).
COMPLIANCE_REASONS = (
    "robots_disallowed", "robots_unavailable", "opted_out", "tdm_reserved", "blocklisted", "rate_limited",
)  # fmt: skip
# Failures worth fetching again (``ingest --retry-failed``); every other reason is a refusal or a fact about the
# image that another request would not change.
TRANSIENT_REASONS = frozenset({
    "timeout", "connection_refused", "connection_error", "dns_error", "rate_limited", "robots_unavailable",
    "no_result", "http_408", "http_429",
})  # fmt: skip


def is_transient(why: str) -> bool:
    """A reason another try may turn into success: timeouts, 5xx, rate limits, unreadable robots.txt."""
    return why in TRANSIENT_REASONS or (why.startswith("http_5") and len(why) == 8)


_HTTP = re.compile(r"HTTP Error (\d{3})")
_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("opted_out", ("x-robots-tag",)),
    ("decompression_bomb", ("image area too large", "cv_io_max_image_pixels", "decompressionbomb")),
    ("too_small", ("image too small",)),
    ("bad_aspect_ratio", ("aspect ratio too large",)),
    ("empty_body", ("!buf.empty()",)),
    ("undecodable_image", ("image decoding error", "cannot identify image")),
    ("timeout", ("timed out", "timeout")),
    ("connection_refused", ("connection refused",)),
    ("dns_error", ("name or service not known", "nodename nor servname", "temporary failure in name")),
    ("connection_error", ("connection reset", "remote end closed", "broken pipe", "urlopen error", "eof")),
    ("too_many_redirects", ("redirect",)),
    ("hash_mismatch", ("hash mismatch",)),
]


def reason(status: str | None, error_message: str | None) -> str:
    """A short, stable reason for one output row: ``success`` or why it failed."""
    if status == "success":
        return "success"
    msg = (error_message or "").strip()
    at = msg.find(REFUSED_PREFIX)  # at 0 before download; inside "<urlopen error ...>" from a worker
    if at >= 0:
        return msg[at + len(REFUSED_PREFIX) :].split(":", 1)[0]
    m = _HTTP.search(msg)
    if m:
        return f"http_{m.group(1)}"
    low = msg.lower()
    for name, needles in _RULES:
        if any(n in low for n in needles):
            return name
    if status == "failed_to_resize":
        return "undecodable_image"
    return "other_error" if msg else "unknown"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def output_schema(input_schema: pa.Schema, column_list: list[str]) -> pa.Schema:
    """The schema img2dataset 1.4x writes for parquet output with sha256 and exif (see its Downloader)."""
    schema = pa.schema([input_schema.field(c) for c in column_list])
    for name, typ in (
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("jpg", pa.binary()),
    ):
        schema = schema.append(pa.field(name, typ))
    return schema


def write_extra_shard(
    batch: str, shard_id: int, rows: pa.Table, column_list: list[str], shard_size: int
) -> None:
    """Write ``rows`` (input columns + ``error_message``) as a failed shard with its stats, like img2dataset."""
    n = rows.num_rows
    oom = math.ceil(math.log10(shard_size))
    keys = [f"{(10**oom) * shard_id + i:0{oom + OOM_SHARD_COUNT}d}" for i in range(n)]
    schema = output_schema(rows.schema, column_list)
    nulls = {f.name: pa.nulls(n, f.type) for f in schema if f.name not in rows.column_names}
    data = {
        **{c: rows.column(c) for c in column_list},
        **nulls,
        "key": pa.array(keys, pa.string()),
        "status": pa.array(["failed_to_download"] * n, pa.string()),
        "error_message": rows.column("error_message"),
    }
    table = pa.table({f.name: data[f.name] for f in schema}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    name = shard_name(shard_id)
    storage.write_bytes_atomic(storage.join(batch, f"{name}.parquet"), buf.getvalue())
    now = time.time()
    status_dict = Counter(rows.column("error_message").to_pylist())
    stats = {
        "count": n,
        "successes": 0,
        "failed_to_download": n,
        "failed_to_resize": 0,
        "duration": 0.0,
        "start_time": now,
        "end_time": now,
        "status_dict": dict(status_dict.most_common(1000)),
    }
    storage.write_bytes_atomic(storage.join(batch, f"{name}_stats.json"), json.dumps(stats).encode())


def scan_batch(batch: str, shard_ids: set[int] | None) -> tuple[Counter, np.ndarray]:
    """``(rows per reason, list-row ids in the order found)`` over the batch's parquet shards (all when
    ``shard_ids`` is None). The ids are one int64 array (8 bytes a row, not a Python int each)."""
    counts: Counter = Counter()
    seen: list[np.ndarray] = []
    for shard in storage.glob(storage.join(batch, "*.parquet")):
        if shard_ids is not None and int(shard.rsplit("/", 1)[-1].split(".")[0]) not in shard_ids:
            continue
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
            f.seek(0)
            cols = [c for c in ("status", "error_message", ROW_COL) if c in schema.names]
            table = pq.read_table(f, columns=cols)
        for status, msg in zip(
            table.column("status").to_pylist(), table.column("error_message").to_pylist(), strict=True
        ):
            counts[reason(status, msg)] += 1
        if ROW_COL in table.column_names:
            seen.append(table.column(ROW_COL).to_numpy().astype(np.int64, copy=False))
    return counts, np.concatenate(seen) if seen else np.empty(0, np.int64)


def done_shards(batch: str) -> set[int]:
    """Shard ids img2dataset considers complete (those with a stats file), as its incremental mode does."""
    names = [u.rsplit("/", 1)[-1] for u in storage.glob(storage.join(batch, "*_stats.json"))]
    return {int(n.split("_", 1)[0]) for n in names}


def shard_stats(batch: str, shard_ids: set[int]) -> list[dict]:
    return [storage.read_json(storage.join(batch, f"{shard_name(i)}_stats.json")) for i in sorted(shard_ids)]


class DoneRows:
    """Rows in the shards img2dataset has finished so far (a progress count); reads each stats file once."""

    def __init__(self, batch: str):
        self.batch, self.counts = batch, {}

    def __call__(self) -> int:
        storage.filesystem(self.batch)[0].invalidate_cache()  # s3fs caches listings
        for uri in storage.glob(storage.join(self.batch, "*_stats.json")):
            if uri not in self.counts:
                self.counts[uri] = int(storage.read_json(uri).get("count", 0))
        return sum(self.counts.values())
