"""URL lists: find the files behind a path/folder/glob (local or s3://), read and validate them, hash them.

Validation happens before anything is downloaded; every problem a user can cause becomes one
:class:`~vlforge.errors.UrlListError` naming the file and the problem. Rows a CSV/TSV parser cannot split are not
dropped: they come back in ``ListTable.malformed`` so the ingest can account for them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import pyarrow as pa

from vlforge import storage
from vlforge.errors import UrlListError

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
    digest = hashlib.sha256()
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ListTable:
    path: str
    table: pa.Table  # every parsed row, url/caption columns renamed to "url"/"caption" (strings)
    malformed: list[str] = field(default_factory=list)  # raw text of rows the parser could not split


def _read_delimited(data: bytes, delimiter: str, malformed: list[str]) -> pa.Table:
    import pyarrow.csv as pacsv

    def on_invalid(row) -> str:
        malformed.append(f"line {row.number}: {row.text}" if row.number is not None else str(row.text))
        return "skip"

    return pacsv.read_csv(
        io.BytesIO(data),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
    )


def _read_json(data: bytes, lines: bool) -> pa.Table:
    import pandas as pd

    text = data.decode("utf-8")
    if not lines:
        try:
            return pa.Table.from_pandas(pd.read_json(io.StringIO(text), dtype=False), preserve_index=False)
        except ValueError:
            pass  # a .json file holding JSON lines
    return pa.Table.from_pandas(
        pd.read_json(io.StringIO(text), lines=True, dtype=False), preserve_index=False
    )


def _read_any(path: str, fmt: str) -> tuple[pa.Table, list[str]]:
    import pyarrow.parquet as pq

    malformed: list[str] = []
    data = storage.read_bytes(path)
    if path.lower().endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)), malformed
    if fmt in ("csv", "tsv"):
        return _read_delimited(data, "," if fmt == "csv" else "\t", malformed), malformed
    return _read_json(data, lines=fmt == "jsonl"), malformed


def read_url_list(path: str, url_col: str = "url", caption_col: str = "caption") -> ListTable:
    """Read and validate one list file; raise UrlListError naming the file and the problem."""
    fmt = list_format(path)
    if fmt is None:
        raise UrlListError(f"URL list {path}: unknown format (expected {', '.join(FORMATS)})")
    try:
        table, malformed = _read_any(path, fmt)
    except FileNotFoundError as exc:
        raise UrlListError(f"URL list {path}: no such file") from exc
    except Exception as exc:  # parser errors, bad encodings, truncated parquet, permissions
        raise UrlListError(f"URL list {path}: cannot be read as {fmt} ({exc})") from exc
    present = table.column_names
    missing = [c for c in (url_col, caption_col) if c not in present]
    if missing:
        raise UrlListError(
            f"URL list {path}: missing column(s) {', '.join(repr(m) for m in missing)}; "
            f"columns present: {', '.join(present) or 'none'} (set --url-col / --caption-col)"
        )
    if table.num_rows == 0 and not malformed:
        raise UrlListError(f"URL list {path}: the list is empty (no rows)")
    table = _canonical(table, url_col, caption_col)
    return ListTable(path, table, malformed)


def _canonical(table: pa.Table, url_col: str, caption_col: str) -> pa.Table:
    """url/caption first, as strings, named ``url``/``caption``; other columns kept as they are."""
    import pyarrow.compute as pc

    url = pc.cast(table.column(url_col), pa.string())
    caption = pc.cast(table.column(caption_col), pa.string())
    others = [c for c in table.column_names if c not in (url_col, caption_col, "url", "caption")]
    return pa.table({"url": url, "caption": caption, **{c: table.column(c) for c in others}})
