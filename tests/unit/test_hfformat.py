"""The published `image` column: datasets' Image layout written with pyarrow, and readers of both layouts."""

from __future__ import annotations

import json

import pyarrow as pa

from vlforge.hfformat import (
    HF_METADATA_KEY,
    IMAGE_TYPE,
    encoded_image,
    encoded_images,
    image_struct,
    with_encoded_images,
    with_hf_features,
)


def test_image_struct_and_both_layouts_read_back_as_bytes():
    raw = pa.array([b"\xff\xd8one", None, b"\x89PNGtwo"], pa.binary())
    col = image_struct(raw)
    assert col.type == IMAGE_TYPE and col.null_count == 1
    assert col.to_pylist()[0] == {"bytes": b"\xff\xd8one", "path": None}
    assert encoded_images(col).to_pylist() == encoded_images(raw).to_pylist() == raw.to_pylist()
    assert encoded_image({"bytes": b"x", "path": None}) == encoded_image(b"x") == b"x"
    table = pa.table({"key": ["a", "b", "c"], "image": col})
    assert with_encoded_images(table).column("image").type == pa.binary()


def test_features_metadata_declares_the_image_and_primitive_columns():
    table = pa.table(
        {
            "key": ["a"],
            "image": image_struct(pa.array([b"x"])),
            "clip_score": pa.array([0.5], pa.float32()),
            "width": pa.array([3], pa.int32()),
            "tags": pa.array([["x"]], pa.list_(pa.string())),
        }
    )
    meta = json.loads(with_hf_features(table).schema.metadata[HF_METADATA_KEY])
    assert meta["info"]["features"] == {
        "key": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "clip_score": {"dtype": "float32", "_type": "Value"},
        "width": {"dtype": "int32", "_type": "Value"},
    }  # the nested column is left to datasets' inference
