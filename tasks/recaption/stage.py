"""The recaption stage: a VLM writes a ``caption_synthetic`` for every row of a dataset version, published as a
new version (of the same dataset, or of ``to``) beside the original ``caption``.

``recaption(dataset, settings, model=...)``:

1. checks its inputs before Ray starts (``tasks.recaption.inputs``): the model is a VLM, the version has rows and
   images, the settings are in range;
2. opens the new version's folder through the same atomic, resumable writer as curate
   (``vlforge.datasets.open_version``): a run of the same inputs killed part-way is resumed, and its finished
   parts are kept (each part's ``_parts/NNNNN.json`` is written after its data file);
3. captions the pending parts on Ray Data (``tasks.recaption.generate``: an actor pool, the model loaded once
   per actor); the driver holds the captions of the parts in flight only, and writes each part (its rows, their
   original columns, and ``caption_synthetic``) as soon as its last caption arrives;
4. copies the source's ``rejected/`` and ``embeddings/`` files, and publishes the manifest last, with the
   dataset card, inside an MLflow run in ``vlforge-datasets`` whose params name the captioning model
   (``captioner_name``/``captioner_version``: ``vlforge lineage`` follows them).

The inputs are the *base* version (the source, or the version the source was itself recaptioned from), the
captioner's weights, the prompt and ``max_new_tokens``: when the target's newest version was made from the same,
nothing is published (``skipped``) unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks.common import retry_unless_user_error
from tasks.recaption.generate import (
    CAPTION_COLUMN,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROMPT,
    build_dataset,
)
from tasks.recaption.inputs import (
    DEFAULT_CAPTIONER,
    Captioner,
    check_captioner,
    check_dataset,
    check_settings,
)
from vlforge import storage
from vlforge.datasets import (
    DatasetNotFoundError,
    DatasetRef,
    DatasetVersion,
    VersionWriter,
    open_version,
    resolve_dataset,
    wait_for_writers,
)
from vlforge.errors import VlforgeError
from vlforge.settings import Settings

log = logging.getLogger(__name__)
DONE_DIR = "_parts"
COPIED_PARTS = ("rejected", "embeddings")  # carried over from the source unchanged
# Manifest fields of the source that still describe the new version's rows.
CARRIED = ("source", "counts", "filters", "scorer", "raw_batches", "embeddings", "selection", "decontamination",
           "licenses", "eval_set", "inputs_fingerprint")  # fmt: skip


@dataclass
class RecaptionResult:
    dataset_version: DatasetVersion
    source: str  # NAME@VERSION recaptioned
    captioner: dict
    rows: int = 0
    captioned: int = 0  # rows captioned in this call (0 when resumed parts covered every row)
    undecodable: int = 0  # rows whose image could not be decoded (no caption)
    resumed_parts: int = 0  # parts kept from an unfinished run of the same inputs
    seconds: float = 0.0
    mlflow_run_id: str | None = None
    skipped: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def captions_per_s(self) -> float:
        return self.captioned / self.seconds if self.seconds else 0.0


class RecaptionInterrupted(VlforgeError):
    """Raised by the ``stop_after_parts`` test hook: the run stops as a killed one would, its folder kept."""


def fingerprint(base: str, captioner: Captioner, prompt: str, max_new_tokens: int, column: str) -> str:
    payload = {"base": base, "captioner": captioner.key, "prompt": prompt, "max_new_tokens": max_new_tokens,
               "column": column}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _unchanged(settings: Settings, name: str, fp: str) -> DatasetVersion | None:
    try:
        latest = resolve_dataset(settings, name)
    except DatasetNotFoundError:
        return None
    return latest if (latest.manifest.get("recaption") or {}).get("fingerprint") == fp else None


def _done_uri(version_uri: str, index: int) -> str:
    return storage.join(version_uri, DONE_DIR, f"{index:05d}.json")


def write_part(writer_uri: str, index: int, source_file: str, keys, captions) -> dict:
    """Write data part ``index``: the source part's rows as stored, ``caption_synthetic`` beside ``caption``
    (replacing an older one), then its done marker; returns the marker."""
    from tasks.curate.shards import read_parquet, schema_dict
    from vlforge.hfformat import with_hf_features

    table = read_parquet(source_file, what="data part")
    if table.num_rows and table.column("key").to_pylist() != [str(k) for k in keys]:
        raise VlforgeError(f"captions of {source_file} came back for other rows than the part holds")
    if CAPTION_COLUMN in table.column_names:
        table = table.drop_columns([CAPTION_COLUMN])
    col = pa.array([None if c is None else str(c) for c in captions], pa.string())
    at = table.column_names.index("caption") + 1 if "caption" in table.column_names else table.num_columns
    table = with_hf_features(table.add_column(at, CAPTION_COLUMN, col))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    relpath = f"data/part-{index:05d}.parquet"
    storage.write_bytes_atomic(storage.join(writer_uri, relpath), data)
    done = {
        "relpath": relpath,
        "digest": hashlib.sha256(data).hexdigest(),
        "rows": table.num_rows,
        "undecodable": int(col.null_count),
        "schema": schema_dict(table),
    }
    storage.write_json_atomic(_done_uri(writer_uri, index), done)
    return done


def _caption_parts(pending, writer: VersionWriter, captioner: str, settings: Settings, opts: dict,
                   progress: bool | None, stop_after_parts: int | None) -> tuple[dict[int, dict], int]:  # fmt: skip
    """Caption ``pending`` ({index: (file, rows)}) on Ray Data; write each part when its last row arrives."""
    from tasks.curate.scoring import progress_line
    from tasks.recaption.generate import _strip_scheme
    from vlforge.raycluster import init_ray

    init_ray(settings)
    by_path = {_strip_scheme(f): (i, f, n) for i, (f, n) in pending.items()}
    ds = build_dataset([f for f, _ in pending.values()], captioner, settings, **opts)
    keys: dict[str, list] = defaultdict(list)
    captions: dict[str, list] = defaultdict(list)
    written: dict[int, dict] = {}
    total = sum(n for _, n in pending.values())
    with progress_line(total, "captions", "recaptioning", progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            paths = np.asarray(batch["path"])
            for p in dict.fromkeys(paths.tolist()):  # in order of first appearance
                sel = paths == p
                path = _strip_scheme(str(p))
                keys[path] += np.asarray(batch["key"])[sel].tolist()
                captions[path] += np.asarray(batch[CAPTION_COLUMN], dtype=object)[sel].tolist()
                index, f, n = by_path[path]
                if len(keys[path]) == n:
                    written[index] = write_part(writer.uri, index, f, keys.pop(path), captions.pop(path))
                    if stop_after_parts is not None and len(written) >= stop_after_parts:
                        raise RecaptionInterrupted(f"stopped after {len(written)} part(s) (test hook)")
            bar.advance(len(paths))
    return written, total


def _copy_carried(source: DatasetVersion, writer: VersionWriter) -> None:
    """``rejected/`` and ``embeddings/`` of the source, byte for byte (files already copied are kept)."""
    for part in COPIED_PARTS:
        fs, root = storage.filesystem(storage.join(source.uri, part))
        root = root.rstrip("/")
        for path in sorted(fs.glob(root + "/**")) if fs.exists(root) else []:
            if fs.isdir(path):
                continue
            relpath = part + "/" + path[len(root) :].lstrip("/")
            dest = storage.join(writer.uri, relpath)
            if storage.exists(dest):
                data = storage.read_bytes(dest)
            else:
                with fs.open(path, "rb") as fh:
                    data = fh.read()
                storage.write_bytes_atomic(dest, data)
            writer.add_part(part, relpath, hashlib.sha256(data).hexdigest())


def recaption(
    dataset: str,
    settings: Settings,
    *,
    model: str = DEFAULT_CAPTIONER,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    to: str | None = None,
    num_captioners: int | None = None,
    force: bool = False,
    track: bool = True,
    progress: bool | None = None,
    stop_after_parts: int | None = None,
) -> RecaptionResult:
    """Write ``caption_synthetic`` for every row of ``dataset`` (``NAME[@VERSION]``) with the VLM ``model`` and
    publish a new version of ``to`` (default: the same dataset); see the module docstring.

    ``stop_after_parts`` is a test hook: stop (as a killed run would) once that many parts are written."""
    check_settings(prompt, max_new_tokens, batch_size, CAPTION_COLUMN)
    if to is not None:
        DatasetRef.parse(to)
        if DatasetRef.parse(to).version:
            raise VlforgeError(f"--to takes a dataset name, not a version ({to!r})")
    source, files, rows = check_dataset(dataset, settings)
    captioner, _ = check_captioner(model, settings)  # a model that is not a VLM fails here, before Ray
    target = to or source.name
    base = (source.manifest.get("recaption") or {}).get("base") or source.ref
    fp = fingerprint(base, captioner, prompt, max_new_tokens, CAPTION_COLUMN)
    if not force:
        wait_for_writers(settings, target, fp)
        if (same := _unchanged(settings, target, fp)) is not None:
            return _nothing_new(same, source, captioner)
    writer, resumed = open_version(settings, target, fp)
    if not force and (same := _unchanged(settings, target, fp)) is not None:
        writer.abandon()  # a recaption of the same inputs published while this one waited
        return _nothing_new(same, source, captioner)
    started = time.perf_counter()
    done = {i: storage.read_json(_done_uri(writer.uri, i)) for i in range(len(files))
            if storage.exists(_done_uri(writer.uri, i))}  # fmt: skip
    resumed_parts = len(done)
    if resumed:
        log.info("resuming %s@%s: %d of %d parts done", target, writer.version, resumed_parts, len(files))
    pending = {i: (f, n) for i, (f, n) in enumerate(zip(files, rows, strict=True)) if i not in done}
    for i, (f, n) in list(pending.items()):
        if n == 0:  # nothing to caption: the part is written as it is, with an empty column
            done[i] = write_part(writer.uri, i, f, [], [])
            del pending[i]
    captioned = 0
    if pending:
        opts = {"prompt": prompt, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "num_captioners": num_captioners}  # fmt: skip
        written, captioned = _caption_parts(
            pending, writer, model, settings, opts, progress, stop_after_parts
        )
        done.update(written)
    seconds = time.perf_counter() - started
    for i in sorted(done):
        writer.add_part("data", done[i]["relpath"], done[i]["digest"])
    _copy_carried(source, writer)
    undecodable = sum(int(d["undecodable"]) for d in done.values())
    info = {
        "base": base,
        "source_version": source.ref,
        "captioner": captioner.as_dict(),
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "column": CAPTION_COLUMN,
        "fingerprint": fp,
        "rows": sum(rows),
        "captioned": sum(rows) - undecodable,
        "undecodable": undecodable,
        "seconds": round(seconds, 3),
        "captions_per_s": round(captioned / seconds, 3) if seconds and captioned else None,
    }
    manifest = {k: source.manifest[k] for k in CARRIED if k in source.manifest}
    schema = dict(source.manifest.get("schema") or {})
    schema["data"] = next(iter(done.values()))["schema"] if done else schema.get("data", {})
    manifest.update({"schema": schema, "recaption": info, "derived_from": source.ref})
    dv, run_id = _publish(writer, manifest, source, captioner, settings, track)
    return RecaptionResult(
        dv, source.ref, captioner.as_dict(), rows=sum(rows), captioned=captioned, undecodable=undecodable,
        resumed_parts=resumed_parts, seconds=seconds, mlflow_run_id=run_id,
        counts={"rows": sum(rows), "captioned": sum(rows) - undecodable, "undecodable": undecodable},
    )  # fmt: skip


def _publish(writer, manifest, source, captioner: Captioner, settings, track: bool):
    """Publish (card, then manifest) inside the version's MLflow run; the event and Prefect artifact after."""
    from tasks.curate.card import card_files
    from tasks.events import emit_dataset_published

    run_id = None
    if track:
        from tasks.curate.report import start_version_run
        from vlforge import tracking

        with start_version_run(settings, writer.name, str(manifest.get("source") or source.name)) as run_id:
            dv = writer.publish({**manifest, "mlflow_run_id": run_id}, describe=card_files)
            info = manifest["recaption"]
            tracking.set_run_tags(
                settings, run_id, {**tracking.dataset_tags(dv), "mlflow.runName": f"recaption {dv.ref}"}
            )
            params = {"stage": "recaption", "source_dataset": source.ref, "base_dataset": info["base"],
                      "captioner_uri": captioner.uri, "captioner_name": captioner.name,
                      "captioner_version": captioner.version or "", "prompt": info["prompt"],
                      "max_new_tokens": info["max_new_tokens"]}  # fmt: skip
            metrics = {
                "rows": info["rows"],
                "captioned": info["captioned"],
                "undecodable": info["undecodable"],
            }
            tracking.log_to_run(settings, run_id, params=params, metrics=metrics)
            tracking.log_dataset_input(settings, run_id, source, context="source")
            tracking.log_dataset_input(settings, run_id, dv, context="output")
    else:
        dv = writer.publish(manifest, describe=card_files)
    storage.remove(storage.join(dv.uri, DONE_DIR))
    _prefect_artifact(dv, captioner)
    emit_dataset_published(dv)  # a recaptioned version can trigger the next CLIP's training
    return dv, run_id


def _prefect_artifact(dv: DatasetVersion, captioner: Captioner) -> None:
    from vlforge.artifacts import artifact_key, publish

    info = dv.manifest["recaption"]
    lines = [f"- URI: `{dv.uri}`", f"- from: `{info['source_version']}`",
             f"- captioner: `{captioner.pinned}`", f"- captioned: {info['captioned']} of {info['rows']} rows"]  # fmt: skip
    publish(artifact_key("recaption", dv.name), f"Recaptioned {dv.ref}", lines, {})


def _nothing_new(same: DatasetVersion, source: DatasetVersion, captioner: Captioner) -> RecaptionResult:
    log.info(
        "%s already holds captions of %s by %s; nothing to publish", same.ref, source.ref, captioner.pinned
    )
    info = same.manifest.get("recaption") or {}
    return RecaptionResult(
        same, source.ref, captioner.as_dict(), rows=int(info.get("rows", 0)),
        undecodable=int(info.get("undecodable", 0)), mlflow_run_id=same.manifest.get("mlflow_run_id"),
        skipped=True,
    )  # fmt: skip


recaption_task = task(
    name="recaption", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error
)(recaption)
