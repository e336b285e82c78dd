"""One data part of a version -> its export files, written by one Ray task (or in-process for small versions).

``webdataset``: tar shards ``{prefix}-NNNNN.tar`` of ``shard_size`` rows, each sample ``{key}.jpg`` (the encoded
image), ``{key}.txt`` (the caption) and ``{key}.json`` (every other column); a shard never spans two parts, so
its number is known before any task runs (the driver numbers them from the parts' row counts). ``hf``: the part
as one Arrow stream file ``data-NNNNN-of-MMMMM.arrow``, the layout ``datasets.Dataset.save_to_disk`` writes.

Each file is written whole (``storage.atomic_file``) and its record ``_progress/<file>.json`` (rows, bytes,
sha256) after it: a file with a record is finished, and a resumed export skips it. ``webdataset.TarWriter``
writes a shard's members; its ``ShardWriter`` is not used: it numbers shards by its own counter and writes them in
place, where ours are numbered from the parts before any task runs and each is written whole, then recorded, so
that a resumed export can trust what it finds.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from vlforge import storage
from vlforge.errors import VlforgeError
from vlforge.hfformat import IMAGE_COLUMN, IMAGE_TYPE, encoded_images, image_struct, with_hf_features

PROGRESS_DIR = "_progress"
READ_BATCH_ROWS = 256  # rows read from a part at a time: a task holds a few hundred images, not its part
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class PartJob:
    """What one task exports: data part ``part`` of the version, into shards from number ``first_shard`` on."""

    part: int
    uri: str
    rows: int
    first_shard: int = 0


@dataclass
class FileRecord:
    name: str
    rows: int
    bytes: int
    sha256: str


def progress_uri(dest: str, name: str) -> str:
    return storage.join(dest, PROGRESS_DIR, f"{name}.json")


def finished(dest: str, name: str) -> FileRecord | None:
    uri = progress_uri(dest, name)
    return FileRecord(**storage.read_json(uri)) if storage.exists(uri) else None


def _record(tmp: str, name: str, rows: int) -> FileRecord:
    """The record of a file written to ``tmp`` (before it is moved into place as ``name``)."""
    h = hashlib.sha256()
    size = 0
    with open(tmp, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return FileRecord(name, rows, size, h.hexdigest())


class ExportError(VlforgeError):
    """An export that cannot run: unknown format, a destination that cannot be written or holds something else,
    a damaged data part."""


def _batches(uri: str, columns: list[str] | None = None):
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=READ_BATCH_ROWS, columns=columns)
    except pa.ArrowInvalid as exc:
        raise ExportError(
            f"data part {uri} cannot be read as parquet ({exc}); the files finished so far are kept, restore the "
            "part and run the export again"
        ) from None


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:05d}.tar"


def shards_of(job: PartJob, shard_size: int) -> int:
    return max(1, math.ceil(job.rows / shard_size)) if job.rows else 0


def sample_key(row: dict) -> str:
    """The WebDataset key of a row: ``{raw_batch}_{key}`` (img2dataset's keys repeat across raw batches), with
    anything but letters, digits, '_' and '-' replaced (WebDataset cuts a member name at its first dot)."""
    key = str(row.get("key", ""))
    if row.get("raw_batch"):
        key = f"{row['raw_batch']}_{key}"
    return _UNSAFE_KEY.sub("_", key)


def _json_safe(value):
    if isinstance(value, float) and value != value:  # NaN -> null
        return None
    if isinstance(value, bytes):
        return None
    return value


def _write_tar(path: str, rows) -> int:
    """Write the (row, image) pairs of ``rows`` as WebDataset samples; returns how many. ``webdataset.TarWriter``
    writes the members; mtime 0 and no owner names make a shard's bytes depend on its rows only, and PAX headers
    take keys longer than ustar's 100 characters."""
    from webdataset import TarWriter

    n = 0
    with TarWriter(path, encoder=False, mtime=0, user="", group="", format="PAX_FORMAT") as tar:
        for row, image in rows:
            other = {k: _json_safe(v) for k, v in row.items() if k not in (IMAGE_COLUMN, "caption")}
            tar.write(
                {
                    "__key__": sample_key(row),
                    "jpg": image,
                    "txt": str(row.get("caption") or "").encode("utf-8"),
                    "json": json.dumps(other, default=str, ensure_ascii=False).encode("utf-8"),
                }
            )
            n += 1
    return n


def _iter_rows(uri: str):
    """(row without the image, encoded image bytes) for every row of a data part, a batch at a time."""
    for batch in _batches(uri):
        table = pa.Table.from_batches([batch])
        if IMAGE_COLUMN not in table.column_names:
            raise ExportError(
                f"data part {uri} has no {IMAGE_COLUMN!r} column: it is not a published part; the files finished "
                "so far are kept, restore the part and run the export again"
            )
        images = encoded_images(table.column(IMAGE_COLUMN)).to_pylist()
        meta = table.drop_columns([IMAGE_COLUMN]).to_pylist()
        yield from zip(meta, images, strict=True)


def write_webdataset_part(job: PartJob, dest: str, prefix: str, shard_size: int) -> list[dict]:
    """The part's shards (finished ones from an earlier run are kept); returns their records."""
    n_shards = shards_of(job, shard_size)
    names = [shard_name(prefix, job.first_shard + i) for i in range(n_shards)]
    records: list[FileRecord | None] = [finished(dest, n) for n in names]
    if all(records):
        return [asdict(r) for r in records]
    rows = _iter_rows(job.uri)
    for i, name in enumerate(names):
        mine = itertools.islice(rows, shard_size)  # always read on: the next shard starts after this one
        if records[i] is not None:
            collections.deque(mine, maxlen=0)
            continue
        with storage.atomic_file(storage.join(dest, name)) as tmp:
            n = _write_tar(tmp, mine)
            records[i] = _record(tmp, name, n)
        storage.write_json_atomic(progress_uri(dest, name), asdict(records[i]))
    return [asdict(r) for r in records]


def arrow_name(part: int, parts: int) -> str:
    return f"data-{part:05d}-of-{parts:05d}.arrow"


def hf_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch in the export's one schema: ``image`` as ``datasets.Image`` storage, columns a part lacks null."""
    if IMAGE_COLUMN in table.column_names:
        i = table.schema.get_field_index(IMAGE_COLUMN)
        table = table.set_column(i, IMAGE_COLUMN, image_struct(encoded_images(table.column(i))))
    cols = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def hf_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """The export's schema: the parts' columns (unified), ``image`` as ``datasets.Image``, features declared."""

    def as_image(s: pa.Schema) -> pa.Schema:
        return pa.schema([pa.field(f.name, IMAGE_TYPE) if f.name == IMAGE_COLUMN else f for f in s])

    unified = pa.unify_schemas([as_image(s.remove_metadata()) for s in schemas], promote_options="permissive")
    return with_hf_features(unified.empty_table()).schema


def write_hf_part(job: PartJob, dest: str, parts: int, schema: pa.Schema) -> list[dict]:
    """The part as one Arrow stream file (``datasets``' on-disk format); returns its record."""
    name = arrow_name(job.part, parts)
    done = finished(dest, name)
    if done is not None:
        return [asdict(done)]
    with storage.atomic_file(storage.join(dest, name)) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in _batches(job.uri):
                writer.write_table(hf_table(pa.Table.from_batches([batch]), schema))
        record = _record(tmp, name, job.rows)
    storage.write_json_atomic(progress_uri(dest, name), asdict(record))
    return [asdict(record)]
