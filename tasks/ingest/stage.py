"""Ingest: URL lists -> raw batches ``raw/<source>/<batch_id>/`` downloaded by img2dataset.

One raw batch per list file; the batch id is the sha256 of the file's content, so the same list again is a no-op
and a new list is a new batch. img2dataset writes straight into the batch folder in incremental mode, so a run
killed at any point resumes at the first shard without a stats file. Rows refused before download go to one more
shard in img2dataset's schema; the batch holds every list row exactly once, checked before ``_SUCCESS`` (a JSON
summary) is written last.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from prefect import task

from tasks.common import retry_unless_user_error
from tasks.ingest import accounting as acc
from tasks.ingest.exif import upright_batch
from tasks.ingest.run import DownloadOptions, run_img2dataset
from tasks.ingest.staging import StagedList, allowed_rows_not_in, load_staged, read_refused, stage_list
from tasks.ingest.urllists import content_hash, find_list_files
from vlforge import console, defaults, raw, storage
from vlforge.errors import UrlListError, VlforgeError
from vlforge.naming import check_name
from vlforge.netguard import NetworkPolicy
from vlforge.settings import Settings

log = logging.getLogger("vlforge.ingest")

DISTRIBUTORS = ("multiprocessing", "ray")


@dataclass
class IngestResult:
    source: str
    url_list: str
    batch_id: str
    uri: str
    rows: int
    counts: dict[str, int]  # rows per status/reason: {"success": 90, "http_404": 3, "timeout": 1, ...}
    success_rate: float
    images_per_s: float
    skipped: bool  # True when the batch already existed
    mlflow_run_id: str | None = None


@dataclass
class _Plan:
    url_list: str
    batch_id: str
    uri: str
    staged: StagedList | None  # None: the batch is complete already


def ingest(
    url_list: str,
    source: str,
    settings: Settings,
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    shard_size: int = defaults.SHARD_SIZE,
    processes: int | None = None,
    threads: int | None = None,
    distributor: str = defaults.DISTRIBUTOR,
    allow_private_networks: bool = False,
    allowed_networks: Sequence[str] | None = None,
    timeout: float = defaults.DOWNLOAD_TIMEOUT_S,
    retries: int = defaults.DOWNLOAD_RETRIES,
    user_agent: str | None = None,
    image_size: int = defaults.IMAGE_SIZE,
    min_image_size: int = defaults.MIN_DOWNLOAD_IMAGE_SIZE,
    max_image_area: float = defaults.MAX_IMAGE_AREA,
    disallowed_header_directives: list[str] | None = None,
    force: bool = False,
) -> list[IngestResult]:
    """Download every list file at ``url_list`` (file, folder or glob; local or s3://) into raw batches of
    ``source``. All lists are validated (and staged) before anything is downloaded.

    Hosts that are or resolve to private, loopback, link-local, multicast or reserved addresses are refused
    (before download, on every redirect and on every connection) unless ``allow_private_networks`` or their
    address lies in one of ``allowed_networks`` (CIDRs).

    ``force``: ingest a list again although its batch is complete (after a bad setting, say): the old batch is
    removed once the list has been read and staged again, then downloaded anew."""
    _check_args(
        source, distributor, shard_size=shard_size, processes=processes, threads=threads, timeout=timeout,
        retries=retries, image_size=image_size, min_image_size=min_image_size, max_image_area=max_image_area,
    )  # fmt: skip
    network = NetworkPolicy.of(allow_private_networks, allowed_networks)
    opts = DownloadOptions(
        shard_size=shard_size,
        processes=processes or os.cpu_count() or 1,
        threads=threads or defaults.DOWNLOAD_THREADS,
        distributor=distributor,
        timeout=timeout,
        retries=retries,
        user_agent_token=user_agent_token(user_agent or settings.user_agent),
        image_size=image_size,
        min_image_size=min_image_size,
        max_image_area=max_image_area,
        network=network,
    )
    if disallowed_header_directives is not None:
        opts.disallowed_header_directives = list(disallowed_header_directives)
    plans = [
        _plan(f, source, settings, url_col, caption_col, network, force) for f in find_list_files(url_list)
    ]
    results = []
    for plan in plans:
        if plan.staged is None:
            result = _completed(plan, source)
            log.info("%s: already ingested as %s, nothing to do", plan.url_list, plan.uri)
        else:
            result = _download(plan, source, settings, opts, url_col, caption_col)
            log.info(summary_line(result))
        results.append(result)
    return results


def user_agent_token(user_agent: str) -> str:
    """The product token of a user agent (``vlforge/0.1 (+https://...)`` -> ``vlforge``): img2dataset sends it as
    ``(compatible; <token>; +...)`` and honours ``X-Robots-Tag: <token>: noai`` addressed to it."""
    token = (user_agent or "vlforge").strip().split()[0].split("/")[0].strip("();,")
    return token.lower() or "vlforge"


# The smallest image img2dataset is asked to resize to: below it every image is a few pixels wide, stored as a
# success that no model can use.
MIN_RESIZE = 16


def _check_args(source: str, distributor: str, **numbers: float | None) -> None:
    """The source's name (the one naming rule) and every numeric option's range, named as the CLI spells it."""
    check_name("source", source, example="'cc3m'")
    if distributor not in DISTRIBUTORS:
        raise VlforgeError(f"unknown distributor {distributor!r}: use one of {', '.join(DISTRIBUTORS)}")
    at_least = {"shard_size": 1, "processes": 1, "threads": 1, "retries": 0, "min_image_size": 0}
    at_least |= {"image_size": MIN_RESIZE, "max_image_area": 1}
    for key, value in numbers.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if key == "timeout" and not (value > 0 and math.isfinite(value)):
            raise VlforgeError(f"{flag} must be > 0 seconds (got {value:g})")
        if key in at_least and value < at_least[key]:
            raise VlforgeError(f"{flag} must be >= {at_least[key]} (got {value:g})")


def _plan(
    path: str,
    source: str,
    settings: Settings,
    url_col,
    caption_col,
    network: NetworkPolicy,
    force: bool = False,
) -> _Plan:
    try:
        batch_id = content_hash(path)[:16]
    except FileNotFoundError as exc:
        raise UrlListError(f"URL list {path}: no such file") from exc
    except Exception as exc:
        raise UrlListError(f"URL list {path}: cannot be read ({exc})") from exc
    uri = raw.batch_uri(settings, source, batch_id)
    if raw.is_complete(uri) and not force:
        return _Plan(path, batch_id, uri, None)
    staging = storage.join(raw.raw_root(settings, source), "_staging", batch_id)
    staged = load_staged(staging)
    if staged is None:
        try:
            staged = stage_list(path, staging, url_col, caption_col, network)
        except (
            BaseException
        ):  # a list that cannot be read, or Ctrl-C: leave no half-made staging folder behind
            storage.remove(staging)
            storage.remove_empty_folders(storage.join(raw.raw_root(settings, source), "_staging"), levels=3)
            raise
    if force and storage.exists(uri):
        log.info("%s: --force: removing the earlier batch %s", path, uri)
        storage.remove(uri)
    return _Plan(path, batch_id, uri, staged)


def _completed(plan: _Plan, source: str) -> IngestResult:
    """The result of an earlier run, from the summary in its ``_SUCCESS`` (rescanned if that is empty)."""
    try:
        summary = storage.read_json(storage.join(plan.uri, raw.SUCCESS))
    except Exception:
        summary = {}
    counts = summary.get("counts")
    if not counts:
        counter, _ = acc.scan_batch(plan.uri, None)
        counts = dict(counter)
    rows = sum(counts.values())
    return IngestResult(
        source=source,
        url_list=plan.url_list,
        batch_id=plan.batch_id,
        uri=plan.uri,
        rows=rows,
        counts=dict(counts),
        success_rate=counts.get("success", 0) / rows if rows else 0.0,
        images_per_s=float(summary.get("images_per_s", 0.0)),
        skipped=True,
        mlflow_run_id=summary.get("mlflow_run_id"),
    )


def _download(plan: _Plan, source: str, settings: Settings, opts: DownloadOptions, url_col, caption_col):
    staged = plan.staged
    n_shards = math.ceil(staged.allowed / opts.shard_size)
    before = acc.done_shards(plan.uri) & set(range(n_shards))
    start = time.perf_counter()
    name = plan.url_list.rsplit("/", 1)[-1]
    with console.progress(staged.allowed, "rows", f"downloading {name}", poll=acc.DoneRows(plan.uri)):
        for attempt in range(2):  # a second pass picks up shards img2dataset gave up on
            if acc.done_shards(plan.uri) >= set(range(n_shards)):
                break
            if attempt:
                log.warning("%s: some shards did not finish; retrying them", plan.uri)
            run_img2dataset(staged, plan.uri, opts, settings)
            storage.filesystem(plan.uri)[0].invalidate_cache()
    elapsed = time.perf_counter() - start
    missing = set(range(n_shards)) - acc.done_shards(plan.uri)
    if missing:
        raise RuntimeError(
            f"ingest of {plan.url_list}: shards {sorted(missing)[:10]} did not finish; run the same command "
            "again to resume (completed shards are kept)"
        )
    shards = [storage.join(plan.uri, f"{acc.shard_name(i)}.parquet") for i in range(n_shards)]
    upright_batch(plan.uri, shards, opts.processes)  # before _SUCCESS: a resumed run finishes it
    counts = _account(plan, staged, n_shards, opts.shard_size)
    new = acc.shard_stats(plan.uri, set(range(n_shards)) - before)
    images_per_s = sum(s["successes"] for s in new) / elapsed if new and elapsed > 0 else 0.0
    rows = sum(counts.values())
    result = IngestResult(
        source, plan.url_list, plan.batch_id, plan.uri, rows, dict(counts),
        counts.get("success", 0) / rows if rows else 0.0, images_per_s, False,
    )  # fmt: skip
    params = {**asdict(opts), "url_col": url_col, "caption_col": caption_col, "url_list": plan.url_list}
    result.mlflow_run_id = _log_mlflow(settings, result, params)
    summary = {**asdict(result), "params": params, "finished_at": time.time()}
    storage.write_json_atomic(storage.join(plan.uri, raw.SUCCESS), summary)  # last: the batch now exists
    storage.remove(staged.uri)
    storage.remove(storage.join(plan.uri, "_tmp"))
    return result


def _account(plan: _Plan, staged: StagedList, n_shards: int, shard_size: int) -> Counter:
    """Check every list row is in the batch exactly once; write refused and unanswered rows as one more shard."""
    import pyarrow as pa

    counts, seen = acc.scan_batch(plan.uri, set(range(n_shards)))
    if len(np.unique(seen)) != len(seen):
        raise RuntimeError(
            f"ingest of {plan.url_list}: duplicated rows in {plan.uri}; remove it and ingest again"
        )
    refused = read_refused(staged)
    extra = [refused]
    lost = allowed_rows_not_in(staged, pa.array(seen, pa.int64()))
    if lost.num_rows:
        msg = acc.REFUSED_PREFIX + "no_result: img2dataset wrote no row for this url"
        extra.append(lost.append_column("error_message", pa.array([msg] * lost.num_rows, pa.string())))
    rows = pa.concat_tables(extra, promote_options="permissive") if len(extra) > 1 else refused
    if rows.num_rows:
        acc.write_extra_shard(plan.uri, n_shards, rows, staged.column_list, shard_size)
        for msg in rows.column("error_message").to_pylist():
            counts[acc.reason("failed_to_download", msg)] += 1
    if sum(counts.values()) != staged.rows:
        raise RuntimeError(
            f"ingest of {plan.url_list}: {sum(counts.values())} output rows for {staged.rows} list rows"
        )
    return counts


def _log_mlflow(settings: Settings, result: IngestResult, params: dict) -> str:
    from vlforge import tracking

    tags = {
        tracking.TAG_SOURCE: result.source,
        tracking.TAG_RAW_BATCH: result.batch_id,
        tracking.TAG_RAW_BATCH_URI: result.uri,
        tracking.TAG_URL_LIST: result.url_list,
    }
    run_id = tracking.start_stage_run(
        settings, "ingest", name=f"ingest {result.source}/{result.batch_id}", tags=tags
    )
    metrics = {
        "rows": result.rows,
        "success_rate": result.success_rate,
        "images_per_s": result.images_per_s,
        **tracking.count_metrics(result.counts),
    }
    tracking.log_to_run(settings, run_id, params=params, metrics=metrics)
    client = tracking.configure(settings)
    client.log_dict(run_id, {**asdict(result), "mlflow_run_id": run_id}, "ingest_summary.json")
    client.set_terminated(run_id)
    return run_id


def summary_line(r: IngestResult) -> str:
    by_reason = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items(), key=lambda kv: -kv[1]))
    return (
        f"ingested {r.url_list} -> {r.uri}: {r.rows} rows, success {r.success_rate:.1%}, "
        f"{r.images_per_s:.1f} images/s ({by_reason})"
    )


ingest_task = task(
    name="ingest",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_user_error,
)(ingest)
