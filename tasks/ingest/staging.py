"""Staging of one URL list before img2dataset sees it: validate, number the rows, refuse what must not be fetched
(bad scheme, malformed URL or row, private host when the guard is on) and interleave the rest by host.

The staged files live in ``raw/<source>/_staging/<batch_id>/``: ``refused.parquet``, then ``input.parquet`` written
last (its presence marks staging complete). They are reused as they are on a resumed run, so the rows of every
shard stay the same even if DNS answers change between runs; a staging killed part-way leaves no ``input.parquet``
and is redone from the list.

Staging streams: the list is read, checked and written in batches of ``batch_rows`` rows, so its memory does not
grow with the list's length. What stays in memory: one batch, DuckDB's sort (at most ``SORT_MEMORY``; it spills
to disk past that), and one small entry per distinct host (its turn count and the guard's verdict). Rows spill to
a local temporary folder as sorted runs (about the list's size on disk).

Interleaving is exact, not windowed: ``input.parquet`` holds the allowed rows in the order of
:func:`interleave_by_host` over the whole list (every host's first row, hosts in order of first appearance, then
every host's second row, and so on), whatever the batch size. It is an external sort on the key (turn, first
position of the host): the key of a row depends only on the rows before it, so each batch is keyed and spilled as
it is read, and DuckDB's out-of-core ``ORDER BY`` sorts the spilled rows (keys are unique, so the order is total).
The same list always stages to the same rows in the same order.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.ingest.accounting import REFUSED_PREFIX, ROW_COL
from tasks.ingest.optout import OptOutList
from tasks.ingest.robots import SiteCheck
from tasks.ingest.urllists import BATCH_ROWS, UrlListReader, read_pinned
from vlforge import netguard, storage

INPUT = (
    "input.parquet"  # rows img2dataset downloads, interleaved by host (written last: marks staging complete)
)
REFUSED = "refused.parquet"  # rows refused before download, with error_message
SITES = "sites.json"  # crawl delays per host, and what staging applied (robots.txt, opt-out lists)
SORT_MEMORY = "256MB"  # DuckDB's memory for the sort; it spills to the staging's temporary folder past it
SORT_BATCH = 8192  # rows per record batch read back from the sort
ROW_GROUP = 100_000  # rows per row group of input.parquet
PART_ROWS = 500_000  # rows per file img2dataset reads at once (rounded down to whole shards)
_TURN = "__vlforge_turn"  # sort key of a run: (turn of the row within its host) << 32 | first position of the host
MALFORMED_ROW = "malformed_row: the list parser could not split this row"

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
    crawl_delays: dict[str, float] = field(default_factory=dict)  # host:port -> robots.txt Crawl-delay (s)
    checks: dict = field(default_factory=dict)  # the staging's settings, recorded (a resumed run keeps them)

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


def _parquet_file(uri: str) -> tuple[pa.Schema, int]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f)
        return meta.schema_arrow, meta.metadata.num_rows


def load_staged(uri: str) -> StagedList | None:
    """The staged list at ``uri`` if its staging completed (read from the parquet footers only)."""
    if not storage.exists(storage.join(uri, INPUT)):
        return None
    schema, allowed = _parquet_file(storage.join(uri, INPUT))
    _, refused = _parquet_file(storage.join(uri, REFUSED))
    extras = [c for c in schema.names if c not in ("url", "caption")]
    sites = storage.join(uri, SITES)
    info = storage.read_json(sites) if storage.exists(sites) else {}
    return StagedList(
        uri, refused + allowed, allowed, extras, info.get("crawl_delays", {}), info.get("checks", {})
    )


class HostTurns:
    """Round-robin sort keys, fed row by row in list order: the k-th row of a host (k = 0, 1, ...) gets
    ``k << 32 | p`` where ``p`` is the position of that host's first row. Sorting by the key puts the hosts' first
    rows first (in order of first appearance), then their second rows, and so on. Keys are unique; positions
    and turns must stay below 2**32 and 2**31."""

    def __init__(self) -> None:
        self._hosts: dict[str, list[int]] = {}  # host -> [first position, rows seen]
        self._position = 0

    def keys(self, hosts: list[str]) -> np.ndarray:
        out = np.empty(len(hosts), dtype=np.int64)
        for i, host in enumerate(hosts):
            entry = self._hosts.get(host)
            if entry is None:
                entry = self._hosts[host] = [self._position + i, 0]
            out[i] = (entry[1] << 32) | entry[0]
            entry[1] += 1
        self._position += len(hosts)
        return out


def interleave_by_host(hosts: list[str]) -> np.ndarray:
    """An order of positions in which hosts take turns (round robin, hosts in order of first appearance), so
    that no single host fills a shard while others wait."""
    return np.argsort(HostTurns().keys(hosts), kind="stable")


def _authority(url: str) -> str:
    """host[:port]: the server a request goes to."""
    return urlsplit(url.strip()).netloc.rsplit("@", 1)[-1].lower()


_AUTHORITY = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/?#]*@)?(?P<host>[^/?#@]*)"


def _authorities(urls: pa.ChunkedArray) -> list[str]:
    """:func:`_authority` of each url (urls that passed the checks), vectorised for ASCII urls."""
    import pyarrow.compute as pc

    if not pc.all(pc.string_is_ascii(urls)).as_py():
        return [_authority(u) for u in urls.to_pylist()]
    hosts = pc.extract_regex(pc.utf8_trim_whitespace(urls), _AUTHORITY)
    return pc.utf8_lower(pc.struct_field(hosts, "host")).to_pylist()


class RowCheck:
    """Per-row refusals: the URL's shape and scheme, the opt-out lists, then (guard on) its host, each distinct
    host checked once, then what its site's robots.txt and tdmrep.json say (each site fetched once)."""

    def __init__(
        self,
        network: netguard.NetworkPolicy,
        opt_out: OptOutList | None = None,
        sites: SiteCheck | None = None,
    ) -> None:
        self.network = network
        self.guard = network.active
        self.opt_out, self.sites = opt_out, sites
        self.verdicts: dict[str, netguard.Refusal | None] = {}  # host -> refusal (None: allowed)

    def refusals(self, urls: list) -> list[str | None]:
        out = self._host_refusals(urls)
        if self.sites is not None:
            out = self.sites.refusals(urls, out)
        return out

    def _host_refusals(self, urls: list) -> list[str | None]:
        hosts: list[str | None] = []
        out: list[str | None] = []
        for url in urls:
            host, refusal = netguard.parse_host(url)
            if refusal is None and self.opt_out:
                opted = self.opt_out.refusal(url, host)
                if opted is not None:  # before any lookup or request for this row
                    hosts.append(None)
                    out.append(opted)
                    continue
            hosts.append(host)
            out.append(None if refusal is None else f"{refusal.reason}: {refusal.detail}")
        if self.guard:
            new = {h for h in hosts if h and h not in self.verdicts}
            refused = netguard.refuse_hosts(new, self.network)
            self.verdicts.update({h: refused.get(h) for h in new})
            for i, host in enumerate(hosts):
                verdict = self.verdicts.get(host) if host else None
                if out[i] is None and verdict is not None:
                    out[i] = f"{verdict.reason}: {verdict.detail}"
        return out


def _staged_schema(canonical: pa.Schema) -> pa.Schema:
    """Extra columns (reserved names as list_<name>) and ROW_COL, then caption and url: img2dataset's order."""
    extras = [
        pa.field(f"list_{f.name}" if f.name in RESERVED else f.name, f.type)
        for f in canonical
        if f.name not in ("url", "caption")
    ]
    return pa.schema(
        [*extras, pa.field(ROW_COL, pa.int64()), canonical.field("caption"), canonical.field("url")]
    )


def _numbered(table: pa.Table, first_row: int, schema: pa.Schema) -> pa.Table:
    columns = [table.column(f.name) for f in table.schema if f.name not in ("url", "caption")]
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    return pa.Table.from_arrays([*columns, rows, table.column("caption"), table.column("url")], schema=schema)


class _Output:
    """A staged file written locally, then moved into place at once (rename; one put on an object store)."""

    def __init__(self, uri: str, spill: str) -> None:
        self.fs, self.path = storage.filesystem(uri)
        self.remote = storage.is_remote(uri)
        if self.remote:
            self.local = os.path.join(spill, f"out-{uuid.uuid4().hex}.parquet")
        else:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.local = f"{self.path}.tmp-{uuid.uuid4().hex}"

    def commit(self) -> None:
        if self.remote:
            self.fs.put_file(self.local, self.path)
            os.remove(self.local)
        else:
            os.replace(self.local, self.path)

    def discard(self) -> None:
        if os.path.exists(self.local):
            os.remove(self.local)


def stage_list(
    path: str,
    uri: str,
    url_col: str,
    caption_col: str,
    network: netguard.NetworkPolicy,
    batch_rows: int = BATCH_ROWS,
    opt_out: OptOutList | None = None,
    sites: SiteCheck | None = None,
    checks: dict | None = None,
) -> StagedList:
    """Read and validate ``path`` (raising UrlListError) batch by batch and write the staged files to ``uri``.
    Rows on an ``opt_out`` list, and rows their site's robots.txt or tdmrep.json refuse (``sites``), are refused
    here, before any request for them; ``checks`` records those settings with the staged files."""
    for leftover in storage.glob(storage.join(uri, "*.tmp-*")):  # from a staging killed part-way
        storage.remove(leftover)

    def stage(pinned: pa.Schema | None) -> StagedList:
        reader = UrlListReader(path, url_col, caption_col, batch_rows, pinned)
        with tempfile.TemporaryDirectory(prefix="vlforge-staging-") as spill:
            outputs = [_Output(storage.join(uri, REFUSED), spill), _Output(storage.join(uri, INPUT), spill)]
            try:
                staged = _stage(reader, uri, RowCheck(network, opt_out, sites), spill, *outputs)
            except BaseException:
                for out in outputs:
                    out.discard()
                raise
            staged.crawl_delays = sites.crawl_delays() if sites is not None else {}
            staged.checks = dict(checks or {})
            info = {"crawl_delays": staged.crawl_delays, "checks": staged.checks}
            storage.write_json_atomic(storage.join(uri, SITES), info)
            for out in outputs:  # input.parquet last: it marks the staging complete
                out.commit()
        return staged

    return read_pinned(path, stage)


def _stage(
    reader: UrlListReader,
    uri: str,
    check: RowCheck,
    spill: str,
    refused_out: _Output,
    input_out: _Output,
) -> StagedList:
    turns = HostTurns()
    runs: list[str] = []
    rows = 0
    schema = refused_writer = None
    try:
        for table in reader:
            if schema is None:
                schema = _staged_schema(reader.schema)
                refused_writer = pq.ParquetWriter(refused_out.local, schema.append(_error_field()))
            table = _numbered(table, rows, schema)
            rows += table.num_rows
            reasons = check.refusals(table.column("url").to_pylist())
            refused = np.array([r is not None for r in reasons], dtype=bool)
            if refused.any():
                messages = pa.array([REFUSED_PREFIX + r for r in reasons if r is not None], pa.string())
                refused_writer.write_table(table.filter(refused).append_column(_error_field(), messages))
            allowed = table.filter(~refused)
            if allowed.num_rows:
                runs.append(_write_run(allowed, turns, spill, len(runs)))
        if schema is None:  # no parsed row at all, only rows the parser could not split
            schema = _staged_schema(reader.schema)
            refused_writer = pq.ParquetWriter(refused_out.local, schema.append(_error_field()))
        if reader.malformed:
            refused_writer.write_table(_malformed_rows(reader.malformed, rows, schema))
    finally:
        if refused_writer is not None:
            refused_writer.close()
    allowed_rows = _write_input(runs, schema, input_out.local, spill)
    extras = [c for c in schema.names if c not in ("url", "caption")]
    return StagedList(uri, rows + len(reader.malformed), allowed_rows, extras)


def _error_field() -> pa.Field:
    return pa.field("error_message", pa.string())


def _malformed_rows(malformed: list[str], first_row: int, schema: pa.Schema) -> pa.Table:
    """The rows the parser could not split, numbered after every parsed row, their text as url."""
    n = len(malformed)
    columns = {f.name: pa.nulls(n, f.type) for f in schema}
    columns["url"] = pa.array([m[:2000] for m in malformed], pa.string())
    columns[ROW_COL] = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    columns["error_message"] = pa.array([REFUSED_PREFIX + MALFORMED_ROW] * n, pa.string())
    return pa.table(columns, schema=schema.append(_error_field()))


def _write_run(allowed: pa.Table, turns: HostTurns, spill: str, index: int) -> str:
    """Key one batch's allowed rows by their turn and spill them as a Parquet file."""
    keys = turns.keys(_authorities(allowed.column("url")))
    path = os.path.join(spill, f"run-{index:06d}.parquet")
    pq.write_table(allowed.append_column(_TURN, pa.array(keys)), path, compression="none")
    return path


def _sorted_runs(runs: list[str], spill: str) -> Iterator[pa.RecordBatch]:
    """The rows of ``runs`` in key order (the key dropped), from DuckDB's external sort."""
    import duckdb

    config = {"memory_limit": SORT_MEMORY, "temp_directory": os.path.join(spill, "sort")}
    query = f'SELECT * EXCLUDE ("{_TURN}") FROM read_parquet(?) ORDER BY "{_TURN}"'
    with duckdb.connect(config=config) as con:
        yield from con.sql(query, params=[runs]).to_arrow_reader(SORT_BATCH)


def _write_input(runs: list[str], schema: pa.Schema, local: str, spill: str) -> int:
    """Sort the runs into ``local`` (row groups of ROW_GROUP rows); the number of rows written. Columns are taken
    by position and cast back to the staged schema: DuckDB's names and types are its own."""
    rows = 0
    pending: list[pa.RecordBatch] = []
    with pq.ParquetWriter(local, schema) as writer:
        for batch in _sorted_runs(runs, spill) if runs else ():
            columns = [col.cast(field.type) for col, field in zip(batch.columns, schema, strict=True)]
            pending.append(pa.RecordBatch.from_arrays(columns, schema=schema))
            if sum(b.num_rows for b in pending) >= ROW_GROUP:
                rows += _flush(writer, pending)
        rows += _flush(writer, pending)
    for path in runs:
        os.remove(path)
    return rows


def _flush(writer: pq.ParquetWriter, pending: list[pa.RecordBatch]) -> int:
    if not pending:
        return 0
    table = pa.Table.from_batches(pending)
    writer.write_table(table, row_group_size=max(table.num_rows, 1))
    pending.clear()
    return table.num_rows


def input_parts(staged: StagedList, shard_size: int, part_rows: int = PART_ROWS) -> str:
    """``input.parquet`` cut into ``input-<shard_size>/part-NNNNNN.parquet`` files of whole shards, the folder
    img2dataset reads. img2dataset's reader loads each input file whole (``pq.read_table``) before cutting it into
    shards, so one big input file puts the whole list in the ingest process's memory (img2dataset #338); with
    parts it holds one part at a time. Every part but the last holds a whole number of shards, so shard ids are
    those of the single file. Written once per shard size (``_COMPLETE`` last) and reused on a resumed run."""
    folder = storage.join(staged.uri, f"input-{shard_size}")
    if storage.exists(storage.join(folder, "_COMPLETE")):
        return folder
    storage.remove(folder)
    part_rows = shard_size * max(1, part_rows // shard_size)
    schema = _parquet_file(staged.input_uri)[0]
    pending: list[pa.RecordBatch] = []
    parts = 0
    with tempfile.TemporaryDirectory(prefix="vlforge-parts-") as spill:

        def write_part(batches: list[pa.RecordBatch]) -> None:
            nonlocal parts
            out = _Output(storage.join(folder, f"part-{parts:06d}.parquet"), spill)
            pq.write_table(pa.Table.from_batches(batches, schema), out.local, row_group_size=ROW_GROUP)
            out.commit()
            parts += 1

        held = 0
        for batch in _parquet_batches(staged.input_uri):
            while held + batch.num_rows >= part_rows:
                take = part_rows - held
                write_part([*pending, batch.slice(0, take)])
                pending, held, batch = [], 0, batch.slice(take)
            if batch.num_rows:
                pending.append(batch)
                held += batch.num_rows
        if pending:
            write_part(pending)
    storage.write_bytes_atomic(storage.join(folder, "_COMPLETE"), str(parts).encode())
    return folder


def _parquet_batches(uri: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)


def read_refused(staged: StagedList) -> pa.Table:
    return pa.Table.from_batches(
        list(_parquet_batches(staged.refused_uri)), _parquet_file(staged.refused_uri)[0]
    )


def allowed_batches(staged: StagedList, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows handed to img2dataset, batch by batch (``columns``: only these)."""
    return _parquet_batches(staged.input_uri, columns or [*staged.column_list])


def read_allowed_rows(staged: StagedList, columns: list[str] | None = None) -> pa.Table:
    wanted = columns or [*staged.column_list]
    schema = pa.schema([_parquet_file(staged.input_uri)[0].field(c) for c in wanted])
    return pa.Table.from_batches(list(allowed_batches(staged, wanted)), schema)


def allowed_rows_not_in(staged: StagedList, row_ids: pa.Array) -> pa.Table:
    """The allowed rows whose ROW_COL is not in ``row_ids`` (img2dataset wrote nothing for them): the ids are
    compared first, and the rows' other columns are read only when some are missing."""
    import pyarrow.compute as pc

    ids = read_allowed_rows(staged, [ROW_COL]).column(ROW_COL)
    missing = ids.filter(pc.invert(pc.is_in(ids, value_set=row_ids)))
    schema = pa.schema([_parquet_file(staged.input_uri)[0].field(c) for c in staged.column_list])
    if not len(missing):
        return schema.empty_table()
    batches = [b.filter(pc.is_in(b.column(ROW_COL), value_set=missing)) for b in allowed_batches(staged)]
    return pa.Table.from_batches(batches, schema)
