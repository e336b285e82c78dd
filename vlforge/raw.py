"""Raw batches: ``raw/<source>/<batch_id>/`` with img2dataset's parquet shards, ``NNNNN_stats.json`` files and a
``_SUCCESS`` marker written last. A batch without ``_SUCCESS`` is incomplete and invisible to curation."""

from __future__ import annotations

from vlforge import storage
from vlforge.settings import Settings

SUCCESS = "_SUCCESS"


def raw_root(settings: Settings, source: str | None = None) -> str:
    root = storage.join(settings.storage_uri, "raw")
    return storage.join(root, source) if source else root


def batch_uri(settings: Settings, source: str, batch_id: str) -> str:
    return storage.join(raw_root(settings, source), batch_id)


def is_complete(uri: str) -> bool:
    return storage.exists(storage.join(uri, SUCCESS))


def list_sources(settings: Settings) -> list[str]:
    return [s for s in storage.list_names(raw_root(settings)) if list_raw_batches(settings, s)]


def list_raw_batches(settings: Settings, source: str) -> list[str]:
    """Ids of the complete batches of ``source``, sorted."""
    root = raw_root(settings, source)
    return [
        b
        for b in storage.list_names(root)
        if not b.startswith((".", "_")) and is_complete(storage.join(root, b))
    ]


def shard_files(uri: str) -> list[str]:
    """The parquet shards of one batch, sorted (``NNNNN.parquet``)."""
    return storage.glob(storage.join(uri, "*.parquet"))


def batch_lineage(settings: Settings, source: str, batch_id: str) -> dict:
    """Where a batch came from, as a dataset manifest records it: ``batch``, ``uri``, and the ``url_list`` and
    ``ingest_run_id`` from the summary ingest writes into ``_SUCCESS`` (absent from a batch without one), and the
    crawl-compliance settings it ran with (``compliance``)."""
    uri = batch_uri(settings, source, batch_id)
    try:
        summary = storage.read_json(storage.join(uri, SUCCESS))
    except (ValueError, OSError):  # an empty marker (a batch written by hand, or by an older ingest)
        summary = {}
    out = {"batch": batch_id, "uri": uri}
    if isinstance(summary, dict) and summary.get("url_list"):
        out["url_list"] = summary["url_list"]
    if isinstance(summary, dict) and summary.get("mlflow_run_id"):
        out["ingest_run_id"] = summary["mlflow_run_id"]
    if isinstance(summary, dict) and summary.get("compliance"):
        out["compliance"] = summary["compliance"]  # robots.txt, opt-out lists, blocklist, user agent
    return out
