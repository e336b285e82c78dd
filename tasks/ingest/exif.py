"""Turn the images of a raw batch upright from their EXIF orientation (a post-pass over img2dataset's shards).

img2dataset 1.4x decodes with OpenCV's ``IMREAD_UNCHANGED``, which ignores the EXIF orientation, and re-encodes
without the tag, so a portrait phone photo (orientation 6, "Rotated 90 CW") is stored sideways. After img2dataset
has finished a batch's shards, and before ``_SUCCESS`` is written, every shard holding a successful row whose
``exif`` column (img2dataset's own record, kept as the evidence) names an orientation other than "Horizontal
(normal)" is rewritten: those images are transposed upright and encoded as img2dataset encodes (JPEG, quality
95), and ``width``/``height``/``original_width``/``original_height`` become the upright image's. ``sha256`` is
img2dataset's hash of the downloaded bytes and stays as it is. A rewritten shard carries ``vlforge.upright`` in
its Parquet metadata, so a resumed or repeated pass never turns an image twice; a shard without turned rows is
left untouched (checking it again reads only its ``exif`` column).
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from vlforge import console, storage

UPRIGHT_KEY = b"vlforge.upright"
EXIF_ORIENTATION = "Image Orientation"
# exifread's names of EXIF orientations 2-8 (1 is "Horizontal (normal)") -> PIL transposes, as ImageOps.exif_transpose.
_TRANSPOSES = {
    "Mirrored horizontal": "FLIP_LEFT_RIGHT",
    "Rotated 180": "ROTATE_180",
    "Mirrored vertical": "FLIP_TOP_BOTTOM",
    "Mirrored horizontal then rotated 90 CCW": "TRANSPOSE",
    "Rotated 90 CW": "ROTATE_270",
    "Mirrored horizontal then rotated 90 CW": "TRANSVERSE",
    "Rotated 90 CCW": "ROTATE_90",
}
_SWAPS_SIDES = {"TRANSPOSE", "ROTATE_270", "TRANSVERSE", "ROTATE_90"}
MAX_WORKERS = 4  # each worker holds one shard (up to a few hundred MB) in memory


def transpose_of(exif_json: str | None) -> str | None:
    """The PIL transpose that makes an image upright, from img2dataset's ``exif`` JSON (None: already upright)."""
    if not exif_json:
        return None
    try:
        value = json.loads(exif_json).get(EXIF_ORIENTATION)
    except (ValueError, AttributeError):
        return None
    return _TRANSPOSES.get(str(value).strip()) if value is not None else None


def upright_batch(batch_uri: str, shard_uris: list[str], workers: int = MAX_WORKERS) -> int:
    """Make every image in ``shard_uris`` upright (see the module docstring); returns how many were turned."""
    turned = 0
    with (
        console.progress(len(shard_uris), "shards", "EXIF orientation") as bar,
        ThreadPoolExecutor(max(1, min(workers, MAX_WORKERS)), thread_name_prefix="vlforge-exif") as pool,
    ):
        for n in pool.map(upright_shard, shard_uris):
            turned += n
            bar.advance()
            bar.update(info=f"{turned} images turned upright")
    return turned


def upright_shard(uri: str) -> int:
    """Rewrite one shard with its images upright (no-op when done before or nothing needs turning)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        metadata = pf.schema_arrow.metadata or {}
        if UPRIGHT_KEY in metadata or "exif" not in pf.schema_arrow.names:
            return 0
        meta = pf.read(columns=["exif", "status"])
    todo = {
        i: t
        for i, (exif, status) in enumerate(
            zip(meta.column("exif").to_pylist(), meta.column("status").to_pylist(), strict=True)
        )
        if status == "success" and (t := transpose_of(exif))
    }
    if not todo:
        return 0
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    table = _turn_rows(table, todo)
    table = table.replace_schema_metadata({**metadata, UPRIGHT_KEY: b"1"})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return len(todo)


def _turn_rows(table: pa.Table, todo: dict[int, str]) -> pa.Table:
    from PIL import Image

    cols = {c: table.column(c).to_pylist() for c in ("jpg", "width", "height")}
    sizes = {
        c: table.column(c).to_pylist()
        for c in ("original_width", "original_height")
        if c in table.column_names
    }
    for i, name in todo.items():
        data = cols["jpg"][i]
        if data is None:
            continue
        with Image.open(io.BytesIO(data)) as img:
            upright = img.transpose(getattr(Image.Transpose, name))
            if upright.mode not in ("RGB", "L"):
                upright = upright.convert("RGB")
            out = io.BytesIO()
            upright.save(out, format="JPEG", quality=95)
        cols["jpg"][i] = out.getvalue()
        cols["width"][i], cols["height"][i] = upright.width, upright.height
        if name in _SWAPS_SIDES and len(sizes) == 2:
            w, h = sizes["original_width"][i], sizes["original_height"][i]
            sizes["original_width"][i], sizes["original_height"][i] = h, w
    for c, values in {**cols, **sizes}.items():
        idx = table.column_names.index(c)
        table = table.set_column(idx, table.field(c), pa.array(values, table.schema.field(c).type))
    return table
