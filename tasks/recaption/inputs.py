"""What a recaption needs, checked before Ray starts: a VLM captioner, a dataset version with rows and images.

Each check raises one :class:`~vlforge.errors.VlforgeError` naming the thing and the fix (the CLI prints it as
one line and exits with 2); nothing has been written when one fails.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow.parquet as pq

from vlforge import defaults, storage
from vlforge.datasets import DatasetVersion, resolve_dataset
from vlforge.errors import ModelNotFoundError, VlforgeError
from vlforge.settings import Settings

VLM_MODEL_TYPE = "llava"  # what models.vlm saves (either adapter)
DEFAULT_CAPTIONER = defaults.DEFAULT_VLM_URI


class RecaptionInputError(VlforgeError):
    """A dataset recaption cannot work on (no rows, no images) or a setting out of range."""


@dataclass(frozen=True)
class Captioner:
    uri: str  # as given
    pinned: str  # models:/NAME/N for a registered version (an alias pinned now), else ``uri``
    name: str
    version: str | None
    key: str  # changes whenever the weights do (tasks.curate.scoring.scorer_identity)

    def as_dict(self) -> dict:
        return {
            "uri": self.uri,
            "pinned": self.pinned,
            "name": self.name,
            "version": self.version,
            "key": self.key,
        }


def check_settings(prompt: str, max_new_tokens: int, batch_size: int, column: str) -> None:
    if not prompt.strip():
        raise RecaptionInputError("--prompt is empty: give the instruction the VLM answers for each image")
    if max_new_tokens < 1:
        raise RecaptionInputError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    if batch_size < 1:
        raise RecaptionInputError(f"--batch-size must be >= 1 (got {batch_size})")
    if column in ("caption", "image", "key"):
        raise RecaptionInputError(f"the synthetic captions cannot replace the {column!r} column")


def check_captioner(uri: str, settings: Settings) -> tuple[Captioner, str]:
    """The captioner's identity and local folder; a model that is not a VLM is refused with its kind."""
    from tasks.curate.scoring import scorer_identity
    from vlforge.registry import resolve_model_dir

    model_dir = resolve_model_dir(uri, settings)
    config = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config):
        raise ModelNotFoundError(
            f"captioner {uri!r} is not a local or registered model folder; recaption needs a VLM trained with "
            f"`vlforge pretrain --recipe vlm-tiny` (e.g. {DEFAULT_CAPTIONER})"
        )
    with open(config) as fh:
        kind = json.load(fh).get("model_type")
    if kind != VLM_MODEL_TYPE:
        raise ModelNotFoundError(
            f"captioner {uri!r} is a {kind!r} model, not a VLM: recaption writes captions with a VLM "
            f"(e.g. {DEFAULT_CAPTIONER}, trained with `vlforge pretrain --recipe vlm-tiny`)"
        )
    info = scorer_identity(uri, settings)
    pinned = f"models:/{info.name}/{info.version}" if info.version else uri
    return Captioner(uri, pinned, info.name, info.version, info.key), model_dir


def part_rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def _columns_and_images(uri: str) -> tuple[list[str], int | None]:
    """A part's column names and how many of its rows have image bytes (None when the footer cannot say)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as fh:
        f = pq.ParquetFile(fh)
        names = list(f.schema_arrow.names)
        meta = f.metadata
        leaves = [i for i in range(meta.num_columns) if f.schema.column(i).path in ("image", "image.bytes")]
        if not leaves:
            return names, None
        with_bytes = 0
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(leaves[0]).statistics
            if stats is None or not stats.has_null_count:
                return names, None
            with_bytes += meta.row_group(g).num_rows - stats.null_count
        return names, with_bytes


def check_dataset(ref: str, settings: Settings) -> tuple[DatasetVersion, list[str], list[int]]:
    """The version, its data parts and their rows; an empty version or one without images is refused."""
    dv = resolve_dataset(settings, ref)
    files = sorted(dv.part_files("data"))
    rows = [part_rows(f) for f in files]
    if not sum(rows):
        raise RecaptionInputError(
            f"dataset {dv.ref} is empty (0 rows): nothing to recaption; curate a pool into it first "
            "(`vlforge curate --source SOURCE --dataset NAME`)"
        )
    first = next(f for f, n in zip(files, rows, strict=True) if n)
    names, _ = _columns_and_images(first)
    missing = [c for c in ("key", "image") if c not in names]
    if missing:
        raise RecaptionInputError(
            f"dataset {dv.ref} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(names)}): recaption writes a caption for each row's image, so it needs a version "
            "published by `vlforge curate` (with images)"
        )
    # From the footers' null counts: stops at the first part with images (None: the footer cannot say).
    if not any(_columns_and_images(f)[1] != 0 for f, n in zip(files, rows, strict=True) if n):
        raise RecaptionInputError(
            f"dataset {dv.ref} has no image bytes in any row: recaption needs the images (curate keeps them in "
            "the 'image' column)"
        )
    return dv, files, rows
