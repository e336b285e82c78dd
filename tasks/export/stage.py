"""``export``: a published version as WebDataset tar shards or a ``datasets.load_from_disk`` folder.

``export_dataset("demo@V", settings, format="webdataset", to="s3://b/shards")``:

1. resolves the version and claims the destination (``_export.json``: what is being exported there; a
   destination that holds something else is refused, one that holds the same unfinished export is resumed);
2. numbers the output files from the data parts' row counts (Parquet footers, no rows read) and writes them, one
   task per data part: in this process for small versions, as Ray tasks when the version is large or
   ``use_ray`` says so (``tasks.export.parts``); finished files are skipped on a resumed run;
3. for ``hf``, writes ``dataset_info.json`` and ``state.json``;
4. writes ``manifest.json`` last (files, rows, the source version and its content hash, the export's own hash);
5. records the export on the version's MLflow run (tag ``vlforge.export.<format>``, artifact
   ``exports/<format>-<content hash>.json``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from tasks.export.args import ExportArgs
from tasks.export.parts import (
    PROGRESS_DIR,
    ExportError,
    PartJob,
    hf_schema,
    shards_of,
    write_hf_part,
    write_webdataset_part,
)
from vlforge import storage
from vlforge.datasets import DatasetVersion, resolve_dataset
from vlforge.errors import VlforgeError
from vlforge.hfformat import hf_features
from vlforge.settings import Settings

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
CLAIM = "_export.json"
RAY_MIN_ROWS = 50_000  # below this (or with one part), the parts are written in this process


@dataclass
class ExportResult:
    uri: str
    format: str
    dataset_version: str  # NAME@VERSION
    rows: int
    files: list[dict] = field(default_factory=list)  # name, rows, bytes, sha256
    skipped: bool = False  # the destination already held this finished export
    resumed: int = 0  # files kept from an earlier, unfinished run
    mlflow_run_id: str | None = None  # the version's run the export was recorded on
    manifest: dict = field(default_factory=dict)
    lineage_error: str | None = None  # MLflow could not be told (the export itself is complete)


def _part_jobs(dv: DatasetVersion, shard_size: int) -> list[PartJob]:
    jobs, first = [], 0
    for i, uri in enumerate(dv.part_files("data")):
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        job = PartJob(i, uri, rows, first)
        first += shards_of(job, shard_size)
        jobs.append(job)
    return jobs


def _claim(dest: str, claim: dict) -> dict | None:
    """Claim ``dest`` for this export; returns its finished manifest when it already holds exactly this export."""
    try:
        names = [n for n in storage.list_names(dest) if not n.startswith(".")]
        manifest_uri = storage.join(dest, MANIFEST)
        if MANIFEST in names:
            manifest = storage.read_json(manifest_uri)
            if {k: manifest.get(k) for k in claim} == claim:
                return manifest
            _refuse(dest, manifest)
        if CLAIM in names:
            earlier = storage.read_json(storage.join(dest, CLAIM))
            if earlier != claim:
                _refuse(dest, earlier)
        elif names:
            raise ExportError(
                f"destination {dest} is not empty and holds no vlforge export ({', '.join(names[:5])}); "
                "export into a new or empty folder"
            )
        storage.write_json_atomic(storage.join(dest, CLAIM), claim)
    except (PermissionError, OSError) as exc:
        raise ExportError(f"cannot write to {dest}: {exc}; choose a --to you can write to") from None
    return None


def _refuse(dest: str, other: dict) -> None:
    what = f"{other.get('format')} export of {(other.get('source') or {}).get('ref')}"
    raise ExportError(
        f"destination {dest} already holds a {what} with other settings; export into another folder, or delete "
        "it first"
    )


def _run_parts(jobs: list[PartJob], fn, args: tuple, settings: Settings, use_ray: bool | None) -> list[dict]:
    rows = sum(j.rows for j in jobs)
    if use_ray is None:
        use_ray = len(jobs) > 1 and rows >= RAY_MIN_ROWS
    from vlforge import console

    records: list[dict] = []
    with console.progress(total=len(jobs), unit="parts", description="exporting") as bar:
        if not use_ray:
            for job in jobs:
                records += fn(job, *args)
                bar.advance()
            return records
        import ray

        from vlforge.raycluster import init_ray

        init_ray(settings)
        task = ray.remote(fn).options(scheduling_strategy="SPREAD")
        pending = [task.remote(job, *args) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                records += ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, VlforgeError | OSError):
                    raise ExportError(
                        f"exporting to {args[0]} failed: {exc.cause}; run again to resume"
                    ) from None
                raise
            bar.advance()
    return records


def _write_hf_metadata(dest: str, dv: DatasetVersion, files: list[dict], schema) -> None:
    """``dataset_info.json`` and ``state.json``: what ``datasets.load_from_disk`` reads first."""
    features = hf_features(schema)
    info = {
        "description": f"vlforge dataset {dv.ref}",
        "features": features if set(features) == set(schema.names) else None,  # else read from the files
        "homepage": dv.uri,
    }
    state = {
        "_data_files": [{"filename": f["name"]} for f in files],
        "_fingerprint": str(dv.manifest.get("content_hash") or dv.version)[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "train",
    }
    storage.write_json_atomic(storage.join(dest, "dataset_info.json"), info)
    storage.write_json_atomic(storage.join(dest, "state.json"), state)


def _files(
    dv: DatasetVersion,
    jobs: list[PartJob],
    fmt: str,
    dest: str,
    prefix: str,
    shard_size: int,
    settings,
    use_ray,
):
    if fmt == "webdataset":
        return _run_parts(jobs, write_webdataset_part, (dest, prefix, shard_size), settings, use_ray)
    schema = hf_schema([_part_schema(j.uri) for j in jobs])
    files = _run_parts(jobs, write_hf_part, (dest, len(jobs), schema), settings, use_ray)
    _write_hf_metadata(dest, dv, files, schema)
    return files


def _part_schema(uri: str):
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as fh:
        return pq.read_schema(fh)


def export_dataset(
    dataset: str,
    settings: Settings,
    args: ExportArgs | None = None,
    *,
    to: str,
    use_ray: bool | None = None,
    track: bool = True,
    **options: Any,
) -> ExportResult:
    """Export ``dataset`` (``NAME`` or ``NAME@VERSION``) to ``to`` (see the module docstring) with the settings
    ``args`` (:class:`~tasks.export.args.ExportArgs`; ``options`` override its fields: ``format="hf"``)."""
    from tasks.common import typed_args

    a = typed_args(ExportArgs, args, options, ExportError)
    format, shard_size, prefix = a.format, a.shard_size, a.prefix
    dest = to.rstrip("/") or to
    _check_outside_storage(dest, settings)
    dv = resolve_dataset(settings, dataset)
    prefix = prefix or dv.name
    source = {"ref": dv.ref, "uri": dv.uri, "content_hash": dv.manifest.get("content_hash")}
    claim = {"format": format, "source": source, "options": {"shard_size": shard_size, "prefix": prefix}}
    if format == "hf":
        claim["options"] = {}
    done = _claim(dest, claim)
    if done is not None:
        log.info("%s already holds this export of %s", dest, dv.ref)
        result = _result(dest, format, dv, done, skipped=True)
        return _record_lineage(result, dv, settings) if track else result
    jobs = [j for j in _part_jobs(dv, shard_size) if j.rows]
    if not jobs:
        raise ExportError(f"dataset {dv.ref} has no rows to export (it kept no pairs)")
    resumed = len(storage.list_names(storage.join(dest, PROGRESS_DIR)))
    for leftover in storage.glob(storage.join(dest, "*.tmp-*")):  # files a killed run was writing
        storage.remove(leftover)
    files = _files(dv, jobs, format, dest, prefix, shard_size, settings, use_ray)
    files.sort(key=lambda f: f["name"])
    digest = hashlib.sha256("".join(f["name"] + f["sha256"] for f in files).encode()).hexdigest()
    manifest = {
        **claim,
        "rows": sum(f["rows"] for f in files),
        "files": files,
        "content_hash": digest,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    if format == "webdataset":  # the brace pattern open_clip's --train-data and webdataset take
        first, last = files[0]["name"][-9:-4], files[-1]["name"][-9:-4]
        manifest["pattern"] = f"{prefix}-{{{first}..{last}}}.tar"
    storage.write_json_atomic(storage.join(dest, MANIFEST), manifest)  # last: the export is complete
    storage.remove(storage.join(dest, PROGRESS_DIR))
    storage.remove(storage.join(dest, CLAIM))
    result = _result(dest, format, dv, manifest, skipped=False, resumed=resumed)
    return _record_lineage(result, dv, settings) if track else result


def _normalised(uri: str) -> str:
    """A comparable form of a destination: an absolute, resolved local path, or ``s3://bucket/key``."""
    if storage.is_remote(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.normpath(rest)}".rstrip("/")
    return os.path.realpath(os.path.expanduser(uri.removeprefix("file://")))


def _check_outside_storage(dest: str, settings: Settings) -> None:
    """Refuse a destination inside the storage root: vlforge would take an export under ``datasets/`` for a
    dataset version (listed, resolved, later collected by ``gc``), and one elsewhere in the root for its own."""
    root, target = _normalised(settings.storage_uri), _normalised(dest)
    if target == root or target.startswith(root.rstrip("/") + "/"):
        raise ExportError(
            f"--to {dest} is inside the storage root {settings.storage_uri}: export to a folder outside it "
            "(vlforge owns everything under the root)"
        )


def _result(dest: str, fmt: str, dv: DatasetVersion, manifest: dict, skipped: bool, resumed: int = 0):
    return ExportResult(
        dest, fmt, dv.ref, int(manifest["rows"]), manifest["files"], skipped, resumed, manifest=manifest
    )


def _record_lineage(result: ExportResult, dv: DatasetVersion, settings: Settings) -> ExportResult:
    """Tag the version's MLflow run with the export and attach its manifest (a version published without a
    run has nowhere to record it: the export is still complete)."""
    run_id = dv.manifest.get("mlflow_run_id")
    if not run_id:
        log.info("%s has no MLflow run; the export is not recorded in lineage", dv.ref)
        return result
    from vlforge import tracking

    try:
        tracking.set_run_tags(
            settings, run_id, {f"vlforge.export.{result.format}": tracking.redact(result.uri)}
        )
        # named by the export's content: recording the same export again (a re-run) replaces it
        name = f"{result.format}-{result.manifest['content_hash'][:12]}.json"
        record = json.dumps({**result.manifest, "uri": tracking.redact(result.uri)}, indent=2)
        tracking.log_files(settings, run_id, {name: record}, artifact_path="exports")
    except Exception as exc:  # the export is complete either way; running it again records it
        result.lineage_error = f"could not record the export on MLflow run {run_id}: {exc}"
        log.warning("%s", result.lineage_error)
        return result
    result.mlflow_run_id = run_id
    return result
