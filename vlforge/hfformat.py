"""The Hugging Face ``datasets`` layout of published Parquet: the ``image`` column and the schema's features.

A version's ``image`` column is what ``datasets.Image`` stores: ``struct<bytes: binary, path: string>`` (the
encoded image in ``bytes``, ``path`` null), and the file's schema metadata carries ``huggingface`` ->
``{"info": {"features": {...}}}`` declaring it an ``Image`` feature, so ``datasets.load_dataset("parquet", ...)``
returns PIL images and the Hub's viewer previews them. Versions published before this layout have a plain binary
``image`` column: :func:`encoded_images` and :func:`encoded_image` read either, so they still train.

Nothing here imports ``datasets``: the layout is written with pyarrow alone.
"""

from __future__ import annotations

import json

import pyarrow as pa

IMAGE_COLUMN = "image"
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
HF_METADATA_KEY = b"huggingface"


def image_struct(images: pa.Array | pa.ChunkedArray) -> pa.StructArray:
    """Encoded image bytes -> the ``Image`` feature's storage (``path`` null; a null image stays null)."""
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    images = images.cast(pa.binary())
    return pa.StructArray.from_arrays(
        [images, pa.nulls(len(images), pa.string())],
        fields=list(IMAGE_TYPE),
        mask=images.is_null(),
    )


def encoded_images(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The encoded image bytes of an ``image`` column in either layout (struct or plain binary)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        return column.field("bytes").cast(pa.binary())
    return column.cast(pa.binary())


def encoded_image(value) -> bytes:
    """One image value as Ray Data / pandas hand it over: a ``{"bytes", "path"}`` dict or raw bytes."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        raise ValueError("the row has no image bytes")
    return bytes(value)


def with_encoded_images(table: pa.Table) -> pa.Table:
    """``table`` with its ``image`` column (if any) as plain encoded bytes, whichever layout it was read in."""
    if IMAGE_COLUMN not in table.column_names:
        return table
    i = table.schema.get_field_index(IMAGE_COLUMN)
    table = table.set_column(i, IMAGE_COLUMN, encoded_images(table.column(i)))
    return table.replace_schema_metadata(None)


def _value_dtype(t: pa.DataType) -> str | None:
    """``datasets.Value``'s dtype name for a primitive Arrow type (None for anything nested or exotic)."""
    names = {"float": "float32", "double": "float64", "halffloat": "float16"}
    if pa.types.is_nested(t) or pa.types.is_dictionary(t):
        return None
    if (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_null(t)
    ):
        return names.get(str(t), "bool" if pa.types.is_boolean(t) else str(t))
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return str(t)
    return None


def hf_features(schema: pa.Schema) -> dict[str, dict]:
    """The ``datasets`` features of ``schema``: ``image`` as ``Image``, primitive columns as ``Value``.

    Nested columns are left out; ``datasets`` infers those from the Arrow type (it reads declared features per
    column)."""
    out = {}
    for f in schema:
        if f.name == IMAGE_COLUMN and f.type == IMAGE_TYPE:
            out[f.name] = {"_type": "Image"}
        elif (dtype := _value_dtype(f.type)) is not None:
            out[f.name] = {"dtype": dtype, "_type": "Value"}
    return out


def with_hf_features(table: pa.Table) -> pa.Table:
    """``table`` whose schema metadata declares its ``datasets`` features (see the module docstring)."""
    meta = dict(table.schema.metadata or {})
    meta[HF_METADATA_KEY] = json.dumps({"info": {"features": hf_features(table.schema)}}).encode()
    return table.replace_schema_metadata(meta)
