"""The settings of an export, typed once: ``vlforge export``'s options and the Python API derive from
:class:`ExportArgs` (where the export goes, ``to``, is the command's own)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlforge.errors import VlforgeError
from vlforge.naming import check_name

FORMATS = ("webdataset", "hf")


class ExportArgs(BaseModel):
    """How a dataset version is written: the format, the shard size and the file name prefix."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field(
        "webdataset", description="webdataset (tar shards) or hf (a datasets.load_from_disk folder)."
    )
    shard_size: int = Field(
        10_000,
        ge=1,
        description="Rows per WebDataset shard.",
        json_schema_extra={"range": "at least 1 row"},
    )
    prefix: str | None = Field(None, description="Shard name prefix (default: the dataset's name).")

    @field_validator("format")
    @classmethod
    def _known_format(cls, fmt: str) -> str:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt

    @field_validator("prefix")
    @classmethod
    def _prefix_follows_the_naming_rule(cls, prefix: str | None) -> str | None:
        if prefix is None:
            return None
        try:
            return check_name("export prefix", prefix, example="'demo'")
        except VlforgeError as exc:  # the CLI shows its message
            raise ValueError(str(exc)) from None
