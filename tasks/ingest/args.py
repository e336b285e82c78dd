"""How URL lists are read and downloaded, typed once: ``vlforge ingest``'s options, the Refresh form's ``ingest``
group and the Python API (``ingest(..., args)`` or keywords) derive from :class:`IngestArgs`.

A field's ``description`` is its help text; its constraints are the range checks, which the CLI reports as
``--timeout must be > 0 seconds (got -1.0)`` (``json_schema_extra``: ``unit`` after the range, ``range`` for a
wording of its own).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlforge import defaults
from vlforge.errors import VlforgeError
from vlforge.netguard import parse_network

DISTRIBUTORS = ("multiprocessing", "ray")
# The smallest image img2dataset is asked to resize to: below it every image is a few pixels wide, stored as a
# success that no model can use.
MIN_RESIZE = 16


class IngestArgs(BaseModel):
    """Settings of an ingest: the list's columns, img2dataset's download, the network guard, crawl compliance."""

    model_config = ConfigDict(extra="forbid")

    url_col: str = Field("url", description="The list's URL column.")
    caption_col: str = Field("caption", description="The list's caption column.")
    shard_size: int = Field(defaults.SHARD_SIZE, ge=1, description="Rows per raw shard.")
    processes: int | None = Field(None, ge=1, description="Download processes (default: cores).")
    threads: int | None = Field(
        None, ge=1, description=f"Threads per process (default: {defaults.DOWNLOAD_THREADS})."
    )
    distributor: str = Field(defaults.DISTRIBUTOR, description="multiprocessing or ray.")
    allow_private_networks: bool = Field(
        False, description="Allow URLs on private/loopback hosts (demo, tests)."
    )
    allowed_networks: list[str] = Field(
        [],
        description="Networks (CIDR, e.g. 10.1.2.0/24) downloads may reach as if public, such as an internal "
        "mirror; every other private address stays refused, on every redirect and connection. Repeatable.",
    )
    timeout: float = Field(
        defaults.DOWNLOAD_TIMEOUT_S,
        gt=0,
        allow_inf_nan=False,
        description="Per-request timeout in seconds.",
        json_schema_extra={"unit": "seconds"},
    )
    retries: int = Field(defaults.DOWNLOAD_RETRIES, ge=0, description="Retries for transient errors.")
    user_agent: str | None = Field(None, description="User agent (default names vlforge).")
    image_size: int = Field(
        defaults.IMAGE_SIZE,
        ge=MIN_RESIZE,
        description="Resize images to fit this size (img2dataset's image_size).",
    )
    min_image_size: int = Field(
        defaults.MIN_DOWNLOAD_IMAGE_SIZE,
        ge=0,
        description="Refuse images smaller than this (pixels, shorter side).",
    )
    max_image_area: int = Field(
        defaults.MAX_IMAGE_AREA, ge=1, description="Refuse larger images (decompression-bomb guard)."
    )
    disallowed_header_directives: list[str] = Field(
        list(defaults.DISALLOWED_HEADER_DIRECTIVES),
        description="X-Robots-Tag directives that refuse an image (img2dataset's); repeatable.",
    )
    ignore_robots_txt: bool = Field(
        False, description="Do not read or obey robots.txt (recorded in the run's tags and the dataset card)."
    )
    opt_out_lists: list[str] = Field(
        [],
        description="Files (local or s3://) of domains or URL prefixes whose owners opted out, one a line "
        "(# comments): never requested. Repeatable.",
    )
    blocklist: str | None = Field(
        None, description="File of PDQ hashes (64 hex a line): matching images are never stored."
    )
    blocklist_distance: int = Field(
        defaults.BLOCKLIST_DISTANCE,
        ge=0,
        le=256,
        description="PDQ Hamming distance (bits of 256) that counts as a blocklist match.",
    )
    max_connections_per_host: int = Field(
        defaults.MAX_CONNECTIONS_PER_HOST,
        ge=1,
        description="Requests in flight to one host, over all workers.",
        json_schema_extra={"range": "at least 1"},
    )
    max_requests_per_host_per_s: float = Field(
        defaults.MAX_REQUESTS_PER_HOST_PER_S,
        gt=0,
        description="Requests a second to one host, over all workers.",
        json_schema_extra={"range": "above 0"},
    )
    rate_limit_tries: int = Field(
        defaults.RATE_LIMIT_TRIES,
        ge=1,
        description="Answers 429/503 (Retry-After honoured) before a row ends rate_limited.",
        json_schema_extra={"range": "at least 1"},
    )

    @field_validator("distributor")
    @classmethod
    def _known_distributor(cls, distributor: str) -> str:
        if distributor not in DISTRIBUTORS:
            raise ValueError(f"unknown distributor {distributor!r}: use one of {', '.join(DISTRIBUTORS)}")
        return distributor

    @field_validator("allowed_networks")
    @classmethod
    def _networks_are_cidrs(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                parse_network(network)
            except VlforgeError as exc:  # the CLI and the form show its message
                raise ValueError(str(exc)) from None
        return networks

    @field_validator("allowed_networks", "opt_out_lists", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class IngestArgsError(VlforgeError):
    """An ingest setting out of its range or of the wrong kind (Python callers; the CLI names the option)."""


def ingest_args(args: IngestArgs | None = None, **options: Any) -> IngestArgs:
    """``args`` (default: the defaults) with ``options`` applied; a bad value is one :class:`IngestArgsError`."""
    from tasks.common import typed_args

    return typed_args(IngestArgs, args, options, IngestArgsError)
