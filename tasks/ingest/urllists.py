"""URL lists: find the files behind a path/folder/glob (local or s3://), read and validate them in record batches,
hash them.

Validation happens before anything is downloaded; every problem a user can cause becomes one
:class:`~vlforge.errors.UrlListError` naming the file and the problem. Rows a CSV/TSV parser cannot split are not
dropped: they come back in ``UrlListReader.malformed`` so the ingest can account for them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow as pa

from vlforge import storage
from vlforge.errors import UrlListError

T = TypeVar("T")

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}


def list_format(path: str) -> str | None:
    """The format of a list file from its name (``.csv``, ``.tsv.gz``, ``.jsonl``...), or None."""
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    return None


def find_list_files(location: str) -> list[str]:
    """The URL list files at ``location``: one file, every list file in a folder, or a glob's matches."""
    try:
        fs, path = storage.filesystem(location)
        if any(c in location for c in "*?["):
            candidates = storage.glob(location)
        elif fs.isdir(path):
            candidates = storage.glob(storage.join(location, "*"))
        elif fs.exists(path):
            return [location]
        else:
            raise UrlListError(f"URL list {location}: no such file or folder")
    except UrlListError:
        raise
    except Exception as exc:  # permissions, unreachable object store, bad URI
        raise UrlListError(f"URL list {location}: cannot be read ({exc})") from exc
    files = [f for f in candidates if list_format(f) and not f.rsplit("/", 1)[-1].startswith((".", "_"))]
    if not files:
        raise UrlListError(
            f"URL list {location}: no list files found (expected {', '.join(FORMATS)}, optionally .gz)"
        )
    return sorted(files)


def content_hash(path: str) -> str:
    """sha256 of the file's bytes, streamed."""
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


BATCH_ROWS = 100_000  # rows read, checked and written at a time while staging
_CSV_BLOCK_BYTES = 1 << 20  # pyarrow's default block: types of csv columns are inferred from the first block
# A csv row longer than the block (a caption cell of megabytes) makes pyarrow give up ("straddling object"): the
# list is read again with blocks this many times larger, up to the largest block, where the row is named.
_CSV_BLOCK_GROWTH = 8
_CSV_MAX_BLOCK_BYTES = 512 << 20
_BLOCK_KEY = b"vlforge.csv_block_bytes"  # where a pinned schema carries the block size of the next read
_MAX_REREADS = 16  # a csv/json list is read again at most this often when its column types widen
_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): (Row #\d+: )?CSV conversion error")


class ListSchemaChanged(Exception):  # noqa: N818 (a signal to read again, not an error a user sees)
    """A later batch of a csv/json list does not fit the column types inferred from its first batch: read the
    list again with ``schema`` pinned (wider types; the reader never guesses twice for the same file)."""

    def __init__(self, schema: pa.Schema):
        super().__init__(str(schema))
        self.schema = schema


class UrlListReader:
    """One list file read in record batches of at most ``batch_rows`` rows, never whole (a ``.json`` file holding
    one JSON array is the exception: it is one document; use JSON lines, csv or parquet for big lists).

    Iterating yields canonical tables: ``url`` and ``caption`` as strings first, the other columns as they are,
    every batch with the same ``schema`` (known once iteration has started). Rows a CSV/TSV parser cannot split
    are collected in ``malformed`` (complete when iteration ends). A csv/json column whose type changes after
    the first batch raises :class:`ListSchemaChanged`; read again with ``pinned=`` that schema.
    """

    def __init__(
        self,
        path: str,
        url_col: str = "url",
        caption_col: str = "caption",
        batch_rows: int = BATCH_ROWS,
        pinned: pa.Schema | None = None,
    ):
        self.path, self.url_col, self.caption_col = path, url_col, caption_col
        self.batch_rows = max(1, int(batch_rows))
        self.pinned = pinned
        self.schema: pa.Schema | None = None
        self.malformed: list[str] = []
        self.fmt = list_format(path)
        if self.fmt is None:
            raise UrlListError(f"URL list {path}: unknown format (expected {', '.join(FORMATS)})")

    def __iter__(self) -> Iterator[pa.Table]:
        rows = 0
        try:
            for item in self._raw():
                if isinstance(item, pa.Schema):
                    self._check_columns(item.names)
                    self.schema = self.pinned or _canonical_schema(item, self.url_col, self.caption_col)
                    continue
                table = _conform(_canonical(item, self.url_col, self.caption_col), self.schema)
                rows += table.num_rows
                if table.num_rows:
                    yield table
        except (UrlListError, ListSchemaChanged):
            raise
        except FileNotFoundError as exc:
            raise UrlListError(f"URL list {self.path}: no such file") from exc
        except Exception as exc:  # parser errors, bad encodings, truncated parquet, permissions
            raise UrlListError(f"URL list {self.path}: cannot be read as {self.fmt} ({exc})") from exc
        if rows == 0 and not self.malformed:
            raise UrlListError(f"URL list {self.path}: the list is empty (no rows)")

    def _check_columns(self, present: list[str]) -> None:
        missing = [c for c in (self.url_col, self.caption_col) if c not in present]
        if missing:
            raise UrlListError(
                f"URL list {self.path}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                f"columns present: {', '.join(present) or 'none'} (set --url-col / --caption-col)"
            )

    def _open(self):
        fs, p = storage.filesystem(self.path)
        return fs.open(p, "rb", compression="gzip" if self.path.lower().endswith(".gz") else None)

    def _raw(self) -> Iterator[pa.Schema | pa.Table]:
        """The file's schema first, then its rows in batches (columns as the file has them)."""
        import pyarrow.parquet as pq

        with self._open() as f:
            if self.fmt == "parquet":
                parquet = pq.ParquetFile(f)
                yield parquet.schema_arrow
                for batch in parquet.iter_batches(batch_size=self.batch_rows):
                    yield pa.Table.from_batches([batch])
            elif self.fmt in ("csv", "tsv"):
                yield from self._delimited(f, "," if self.fmt == "csv" else "\t")
            else:
                yield from self._json(f)

    def _delimited(self, f, delimiter: str) -> Iterator[pa.Schema | pa.Table]:
        import pyarrow.csv as pacsv

        def on_invalid(row) -> str:
            text = f"line {row.number}: {row.text}" if row.number is not None else str(row.text)
            self.malformed.append(text)
            return "skip"

        types = {self.url_col: pa.string(), self.caption_col: pa.string()}
        block = _CSV_BLOCK_BYTES
        if self.pinned is not None:
            names = {"url": self.url_col, "caption": self.caption_col}
            types |= {names.get(fl.name, fl.name): fl.type for fl in self.pinned if fl.type != pa.null()}
            block = int((self.pinned.metadata or {}).get(_BLOCK_KEY, block))
        try:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=block, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types=types),
            )
        except pa.ArrowInvalid as exc:
            self._larger_block(exc, block, self.pinned or pa.schema([]))
            raise
        yield reader.schema
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:
                self._larger_block(exc, block, self.pinned or self.schema or pa.schema([]))
                found = _CSV_CONVERSION.search(str(exc))
                if not found:
                    raise
                name = reader.schema.names[int(found.group(1))]
                raise ListSchemaChanged(_widen(self.schema, {_renamed(name, self): pa.string()})) from exc
            for start in range(0, batch.num_rows, self.batch_rows):
                yield pa.Table.from_batches([batch.slice(start, self.batch_rows)])

    def _larger_block(self, exc: pa.ArrowInvalid, block: int, schema: pa.Schema) -> None:
        """A row longer than the csv block: read again with larger blocks (the schema carries the size), or, past
        the largest block, one error that says so."""
        if "straddling" not in str(exc):
            return
        if block >= _CSV_MAX_BLOCK_BYTES:
            raise UrlListError(
                f"URL list {self.path}: a row is longer than {_CSV_MAX_BLOCK_BYTES >> 20} MiB (a caption cell of "
                "that size is not a caption); remove it or split the list"
            ) from exc
        bigger = min(block * _CSV_BLOCK_GROWTH, _CSV_MAX_BLOCK_BYTES)
        raise ListSchemaChanged(schema.with_metadata({**(schema.metadata or {}), _BLOCK_KEY: str(bigger)}))

    def _json(self, f) -> Iterator[pa.Schema | pa.Table]:
        import pandas as pd

        head = io.TextIOWrapper(f, encoding="utf-8").readline()
        if self.fmt == "json" and not _one_json_object(head):  # one JSON document (an array): read whole
            with self._open() as again:
                whole = pd.read_json(io.TextIOWrapper(again, encoding="utf-8"), dtype=False)
            table = pa.Table.from_pandas(whole, preserve_index=False)
            yield table.schema
            for start in range(0, table.num_rows, self.batch_rows):
                yield table.slice(start, self.batch_rows)
            return
        first = True
        with self._open() as again:  # JSON lines: one object per line, read chunk by chunk
            lines = io.TextIOWrapper(again, encoding="utf-8")
            with pd.read_json(lines, lines=True, dtype=False, chunksize=self.batch_rows) as chunks:
                for chunk in chunks:
                    table = pa.Table.from_pandas(chunk, preserve_index=False)
                    if first:
                        yield table.schema
                        first = False
                    yield table
        if first:
            yield pa.schema([])


def _one_json_object(line: str) -> bool:
    """Whether ``line`` alone is one JSON object (then the file holds JSON lines)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _renamed(name: str, reader: UrlListReader) -> str:
    return {reader.url_col: "url", reader.caption_col: "caption"}.get(name, name)


def _canonical_schema(schema: pa.Schema, url_col: str, caption_col: str) -> pa.Schema:
    others = [f for f in schema if f.name not in (url_col, caption_col, "url", "caption")]
    return pa.schema([pa.field("url", pa.string()), pa.field("caption", pa.string()), *others])


def _widen(schema: pa.Schema, wider: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(f.name, wider.get(f.name, f.type)) for f in schema])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns and types (missing columns null); raises ListSchemaChanged with
    a wider schema when a column is new or its values do not fit the type chosen so far."""
    if table.schema.equals(schema):
        return table
    wider: dict[str, pa.DataType] = {}
    for f in table.schema:
        if f.name not in schema.names:
            continue
        want = schema.field(f.name).type
        if f.type != want and not _fits(table.column(f.name), want):
            try:
                wider[f.name] = (
                    pa.unify_schemas(
                        [pa.schema([pa.field(f.name, want)]), pa.schema([f])], promote_options="permissive"
                    )
                    .field(f.name)
                    .type
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                wider[f.name] = pa.string()
    new = [f for f in table.schema if f.name not in schema.names]
    if wider or new:
        raise ListSchemaChanged(pa.schema([*_widen(schema, wider), *new]))
    columns = {
        f.name: table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(len(table), f.type)
        for f in schema
    }
    return pa.table(columns, schema=schema)


def _fits(column: pa.ChunkedArray, to: pa.DataType) -> bool:
    try:
        column.cast(to)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False


def _canonical(table: pa.Table, url_col: str, caption_col: str) -> pa.Table:
    """url/caption first, as strings, named ``url``/``caption``; other columns kept as they are."""
    import pyarrow.compute as pc

    url = pc.cast(table.column(url_col), pa.string())
    caption = pc.cast(table.column(caption_col), pa.string())
    others = [c for c in table.column_names if c not in (url_col, caption_col, "url", "caption")]
    return pa.table({"url": url, "caption": caption, **{c: table.column(c) for c in others}})


@dataclass
class ListTable:
    path: str
    table: pa.Table  # every parsed row, url/caption columns renamed to "url"/"caption" (strings)
    malformed: list[str] = field(default_factory=list)  # raw text of rows the parser could not split


def read_pinned(path: str, read: Callable[[pa.Schema | None], T]) -> T:
    """``read(pinned)`` again with the wider schema each time a csv/json list's column types change mid-file."""
    pinned = None
    for _ in range(_MAX_REREADS):
        try:
            return read(pinned)
        except ListSchemaChanged as changed:
            pinned = changed.schema
    raise UrlListError(f"URL list {path}: column types keep changing along the file ({pinned})")


def read_url_list(
    path: str, url_col: str = "url", caption_col: str = "caption", batch_rows: int = BATCH_ROWS
) -> ListTable:
    """Read and validate one whole list file (small lists; staging streams with :class:`UrlListReader`)."""

    def read(pinned: pa.Schema | None) -> ListTable:
        reader = UrlListReader(path, url_col, caption_col, batch_rows, pinned)
        tables = list(reader)
        table = pa.concat_tables(tables) if tables else reader.schema.empty_table()
        return ListTable(path, table, reader.malformed)

    return read_pinned(path, read)
