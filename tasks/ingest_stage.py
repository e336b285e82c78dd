"""Staging of one URL list before img2dataset sees it: validate, number the rows, refuse what must not be fetched
(bad scheme, malformed URL or row, private host when the guard is on) and interleave the rest by host.

The staged files live in ``raw/<source>/_staging/<batch_id>/`` and are reused as they are on a resumed run, so
the rows of every shard stay the same even if DNS answers change between runs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.ingest_accounting import REFUSED_PREFIX, ROW_COL
from tasks.urllists import read_url_list
from vlforge import netguard, storage

INPUT = (
    "input.parquet"  # rows img2dataset downloads, interleaved by host (written last: marks staging complete)
)
REFUSED = "refused.parquet"  # rows refused before download, with error_message

# Column names img2dataset reserves for its own output: list columns with these names are carried as list_<name>.
RESERVED = {
    "key", "status", "error_message", "width", "height", "original_width", "original_height", "exif",
    "md5", "sha256", "sha512", "jpg", "txt", ROW_COL,
}  # fmt: skip


@dataclass
class StagedList:
    uri: str  # the staging folder
    rows: int  # rows of the URL list, malformed ones included
    allowed: int  # rows handed to img2dataset
    extra_columns: list[str]  # carried through img2dataset (ROW_COL last)

    @property
    def input_uri(self) -> str:
        return storage.join(self.uri, INPUT)

    @property
    def refused_uri(self) -> str:
        return storage.join(self.uri, REFUSED)

    @property
    def column_list(self) -> list[str]:
        """img2dataset's input column order for these save_additional_columns."""
        return [*self.extra_columns, "caption", "url"]


def _write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def _read_parquet(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _describe(uri: str, refused: pa.Table, allowed: pa.Table) -> StagedList:
    extras = [c for c in allowed.column_names if c not in ("url", "caption")]
    return StagedList(uri, refused.num_rows + allowed.num_rows, allowed.num_rows, extras)


def load_staged(uri: str) -> StagedList | None:
    if not storage.exists(storage.join(uri, INPUT)):
        return None
    return _describe(uri, _read_parquet(storage.join(uri, REFUSED)), _read_parquet(storage.join(uri, INPUT)))


def interleave_by_host(hosts: list[str]) -> np.ndarray:
    """An order of positions in which hosts take turns (round robin, hosts in order of first appearance), so
    that no single host fills a shard while others wait."""
    first: dict[str, int] = {}
    seen: dict[str, int] = {}
    rank = np.empty(len(hosts), dtype=np.int64)
    host_order = np.empty(len(hosts), dtype=np.int64)
    for i, h in enumerate(hosts):
        host_order[i] = first.setdefault(h, len(first))
        rank[i] = seen.get(h, 0)
        seen[h] = rank[i] + 1
    return np.lexsort((host_order, rank))  # by rank, then host


def _authority(url: str) -> str:
    """host[:port]: the server a request goes to."""
    return urlsplit(url.strip()).netloc.rsplit("@", 1)[-1].lower()


def _with_rows(table: pa.Table, malformed: list[str]) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Number the rows; append the unparseable ones (their text as url) so that none is dropped."""
    renames = [f"list_{c}" if c in RESERVED else c for c in table.column_names]
    table = table.rename_columns(renames)
    n = table.num_rows
    table = table.append_column(ROW_COL, pa.array(np.arange(n, dtype=np.int64)))
    refusals: list[tuple[int, str]] = []
    if malformed:
        extra = {
            f.name: pa.nulls(len(malformed), f.type) for f in table.schema if f.name not in ("url", ROW_COL)
        }
        extra["url"] = pa.array([m[:2000] for m in malformed], pa.string())
        extra[ROW_COL] = pa.array(np.arange(n, n + len(malformed), dtype=np.int64))
        table = pa.concat_tables([table, pa.table(extra, schema=table.schema)])
        refusals = [
            (n + i, "malformed_row: the list parser could not split this row") for i in range(len(malformed))
        ]
    return table, refusals


def stage_list(
    path: str, uri: str, url_col: str, caption_col: str, network: netguard.NetworkPolicy
) -> StagedList:
    """Read and validate ``path`` (raising UrlListError) and write the staged files to ``uri``."""
    listed = read_url_list(path, url_col, caption_col)
    table, refusals = _with_rows(listed.table, listed.malformed)
    refused_rows = {i for i, _ in refusals}
    hosts: list[str | None] = [None] * table.num_rows
    for i, url in enumerate(table.column("url").to_pylist()):
        if i in refused_rows:
            continue
        host, refusal = netguard.parse_host(url)
        if refusal is not None:
            refusals.append((i, f"{refusal.reason}: {refusal.detail}"))
        hosts[i] = host
    if network.active:
        bad_hosts = netguard.refuse_hosts(
            (h for i, h in enumerate(hosts) if h and i not in refused_rows), network
        )
        for i, h in enumerate(hosts):
            if h in bad_hosts:
                refusals.append((i, f"{bad_hosts[h].reason}: {bad_hosts[h].detail}"))
    refusals.sort()
    refused_idx = [i for i, _ in refusals]
    skip = set(refused_idx)
    allowed_idx = np.array([i for i in range(table.num_rows) if i not in skip], dtype=np.int64)
    urls = table.column("url").to_pylist()
    order = allowed_idx[interleave_by_host([_authority(urls[i]) for i in allowed_idx])]
    column_order = [c for c in table.column_names if c not in ("url", "caption")] + ["caption", "url"]
    allowed = table.take(pa.array(order, pa.int64())).select(column_order)
    refused = table.take(pa.array(refused_idx, pa.int64())).select(column_order)
    refused = refused.append_column(
        "error_message", pa.array([REFUSED_PREFIX + r for _, r in refusals], pa.string())
    )
    _write_parquet(storage.join(uri, REFUSED), refused)
    _write_parquet(storage.join(uri, INPUT), allowed)  # last: its presence marks the staging complete
    return _describe(uri, refused, allowed)


def read_refused(staged: StagedList) -> pa.Table:
    return _read_parquet(staged.refused_uri)


def read_allowed_rows(staged: StagedList) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(staged.input_uri)), columns=[*staged.column_list])
