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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from prefect import task

from tasks.common import retry_unless_user_error
from tasks.ingest import accounting as acc
from tasks.ingest import politeness, retry
from tasks.ingest.args import IngestArgs, ingest_args
from tasks.ingest.blocklist import BlocklistRef
from tasks.ingest.blocklist import publish as publish_blocklist
from tasks.ingest.exif import upright_batch
from tasks.ingest.fetch import CrawlPolicy
from tasks.ingest.optout import OptOutList, load_opt_out_lists
from tasks.ingest.robots import SiteCheck
from tasks.ingest.run import DownloadOptions, run_img2dataset
from tasks.ingest.staging import (
    RowCheck,
    StagedList,
    allowed_rows_not_in,
    load_staged,
    read_refused,
    stage_list,
)
from tasks.ingest.urllists import content_hash, find_list_files
from vlforge import console, defaults, raw, storage
from vlforge.errors import UrlListError
from vlforge.naming import check_name
from vlforge.netguard import NetworkPolicy
from vlforge.settings import Settings

log = logging.getLogger("vlforge.ingest")


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
class Compliance:
    """The run's crawl-compliance settings (the workers get theirs as a ``fetch.CrawlPolicy``)."""

    robots_txt: bool
    user_agent: str
    opt_out: OptOutList = field(default_factory=OptOutList)
    blocklist: BlocklistRef | None = None
    max_connections_per_host: int = defaults.MAX_CONNECTIONS_PER_HOST
    max_requests_per_host_per_s: float = defaults.MAX_REQUESTS_PER_HOST_PER_S
    rate_limit_tries: int = defaults.RATE_LIMIT_TRIES

    def record(self) -> dict:
        """For the batch's ``_SUCCESS``, its MLflow run and the dataset card (digests, never contents)."""
        return {
            "robots_txt": "respected" if self.robots_txt else "ignored (--ignore-robots-txt)",
            "tdm_reservation": "respected",
            "user_agent": self.user_agent,
            "opt_out_lists": [{"file": f, "sha256": d} for f, d in self.opt_out.digests.items()],
            "blocklist": None
            if self.blocklist is None
            else {"sha256": self.blocklist.digest, "hashes": self.blocklist.size,
                  "max_distance": self.blocklist.distance},
            "max_connections_per_host": self.max_connections_per_host,
            "max_requests_per_host_per_s": self.max_requests_per_host_per_s,
            "rate_limit_tries": self.rate_limit_tries,
        }  # fmt: skip

    def staging_record(self) -> dict:
        """The part staging applies: a batch resumed with other flags keeps what its rows were checked with."""
        return {k: v for k, v in self.record().items() if k in STAGING_CHECKS}


STAGING_CHECKS = ("robots_txt", "opt_out_lists")


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
    args: IngestArgs | None = None,
    *,
    retry_failed: bool = False,
    force: bool = False,
    **options: Any,
) -> list[IngestResult]:
    """Download every list file at ``url_list`` (file, folder or glob; local or s3://) into raw batches of
    ``source``, with the settings ``args`` (:class:`~tasks.ingest.args.IngestArgs`; ``options`` override its
    fields by name: ``ingest(path, "web", settings, shard_size=500)``). All lists are validated (and staged)
    before anything is downloaded.

    Hosts that are or resolve to private, loopback, link-local, multicast or reserved addresses are refused
    (before download, on every redirect and on every connection) unless ``allow_private_networks`` or their
    address lies in one of ``allowed_networks`` (CIDRs).

    Crawl compliance (``tasks.ingest.robots``, ``optout``, ``politeness``, ``fetch``, ``blocklist``): rows on an
    ``opt_out_lists`` file, and rows their site's robots.txt (unless ``ignore_robots_txt``) or tdmrep.json
    refuse, are never requested; requests share per-host limits over the whole run; images matching the PDQ
    ``blocklist`` within ``blocklist_distance`` bits are dropped where they arrive, before anything is written.

    ``retry_failed``: for a list already ingested, fetch again only the rows that failed transiently.
    ``force``: ingest a list again although its batch is complete (after a bad setting, say): the old batch is
    removed once the list has been read and staged again, then downloaded anew."""
    a = ingest_args(args, **options)
    check_name("source", source, example="'cc3m'")
    network = NetworkPolicy.of(a.allow_private_networks, a.allowed_networks)
    agent = a.user_agent or settings.user_agent
    compliance = Compliance(
        robots_txt=not a.ignore_robots_txt,
        user_agent=agent,
        opt_out=load_opt_out_lists(list(a.opt_out_lists)),
        blocklist=publish_blocklist(a.blocklist, storage.join(settings.storage_uri, "blocklists"),
                                    a.blocklist_distance) if a.blocklist else None,
        max_connections_per_host=a.max_connections_per_host,
        max_requests_per_host_per_s=a.max_requests_per_host_per_s,
        rate_limit_tries=a.rate_limit_tries,
    )  # fmt: skip
    opts = DownloadOptions(
        shard_size=a.shard_size,
        processes=a.processes or os.cpu_count() or 1,
        threads=a.threads or defaults.DOWNLOAD_THREADS,
        distributor=a.distributor,
        timeout=a.timeout,
        retries=a.retries,
        user_agent_token=user_agent_token(agent),
        image_size=a.image_size,
        min_image_size=a.min_image_size,
        max_image_area=a.max_image_area,
        disallowed_header_directives=list(a.disallowed_header_directives),
        network=network,
    )
    url_col, caption_col = a.url_col, a.caption_col
    sites = SiteCheck(agent, opts.user_agent_token, a.timeout, network, robots=compliance.robots_txt)
    plans = [
        _plan(f, source, settings, url_col, caption_col, network, compliance, sites, force)
        for f in find_list_files(url_list)
    ]
    results = []
    for plan in plans:
        if plan.staged is None and retry_failed:
            check = RowCheck(network, compliance.opt_out, sites)
            result = _retry_failed(plan, source, settings, opts, url_col, caption_col, compliance, check)
            log.info(summary_line(result))
        elif plan.staged is None:
            result = _completed(plan, source)
            log.info("%s: already ingested as %s, nothing to do", plan.url_list, plan.uri)
        else:
            result = _download(plan, source, settings, opts, url_col, caption_col, compliance)
            log.info(summary_line(result))
        results.append(result)
    return results


def user_agent_token(user_agent: str) -> str:
    """The product token of a user agent (``vlforge/0.1 (+https://...)`` -> ``vlforge``): img2dataset sends it as
    ``(compatible; <token>; +...)`` and honours ``X-Robots-Tag: <token>: noai`` addressed to it."""
    token = (user_agent or "vlforge").strip().split()[0].split("/")[0].strip("();,")
    return token.lower() or "vlforge"


def _plan(
    path: str,
    source: str,
    settings: Settings,
    url_col,
    caption_col,
    network: NetworkPolicy,
    compliance: Compliance | None = None,
    sites: SiteCheck | None = None,
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
        opt_out = compliance.opt_out if compliance is not None else None
        checks = compliance.staging_record() if compliance is not None else None
        try:
            staged = stage_list(
                path, staging, url_col, caption_col, network, opt_out=opt_out, sites=sites, checks=checks
            )
        # A list that cannot be read, or Ctrl-C: leave no half-made staging folder behind.
        except BaseException:
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


def _gate_bind(opts: DownloadOptions, settings: Settings) -> str:
    """Where the per-host gate listens: loopback, unless Ray workers on other nodes must reach it."""
    if opts.distributor == "ray" and settings.ray_address:
        import ray

        return ray.util.get_node_ip_address()
    return "127.0.0.1"


def _fetch_shards(plan: _Plan, settings: Settings, opts: DownloadOptions, compliance: Compliance):
    """Run img2dataset on the plan's staged rows into ``plan.uri`` with the per-host gate served meanwhile;
    ``(shards, images/s of the shards done now)``."""
    staged = plan.staged
    gate = politeness.HostGate(
        compliance.max_connections_per_host, compliance.max_requests_per_host_per_s, staged.crawl_delays
    )
    n_shards = math.ceil(staged.allowed / opts.shard_size)
    before = acc.done_shards(plan.uri) & set(range(n_shards))
    start = time.perf_counter()
    name = plan.url_list.rsplit("/", 1)[-1]
    with (
        politeness.serve(gate, _gate_bind(opts, settings)) as address,
        console.progress(staged.allowed, "rows", f"downloading {name}", poll=acc.DoneRows(plan.uri)),
    ):
        crawl = CrawlPolicy(compliance.user_agent, address, compliance.blocklist, compliance.rate_limit_tries,
                            robots=compliance.robots_txt,
                            opt_out=compliance.opt_out or None)  # fmt: skip
        for attempt in range(2):  # a second pass picks up shards img2dataset gave up on
            if acc.done_shards(plan.uri) >= set(range(n_shards)):
                break
            if attempt:
                log.warning("%s: some shards did not finish; retrying them", plan.uri)
            run_img2dataset(staged, plan.uri, replace(opts, crawl=crawl), settings)
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
    new = acc.shard_stats(plan.uri, set(range(n_shards)) - before)
    images_per_s = sum(s["successes"] for s in new) / elapsed if new and elapsed > 0 else 0.0
    return n_shards, images_per_s


def _download(plan: _Plan, source: str, settings: Settings, opts: DownloadOptions, url_col, caption_col,
              compliance: Compliance):  # fmt: skip
    staged = plan.staged
    n_shards, images_per_s = _fetch_shards(plan, settings, opts, compliance)
    counts = _account(plan, staged, n_shards, opts.shard_size)
    result = _finish(plan, source, settings, opts, counts, images_per_s, url_col, caption_col, compliance)
    storage.remove(staged.uri)
    storage.remove(storage.join(plan.uri, "_tmp"))
    return result


def _finish(plan: _Plan, source: str, settings: Settings, opts: DownloadOptions, counts: Counter,
            images_per_s: float, url_col, caption_col, compliance: Compliance, **extra) -> IngestResult:  # fmt: skip
    """Log the batch's MLflow run and write its ``_SUCCESS`` summary (last: the batch now exists)."""
    rows = sum(counts.values())
    result = IngestResult(
        source, plan.url_list, plan.batch_id, plan.uri, rows, dict(counts),
        counts.get("success", 0) / rows if rows else 0.0, images_per_s, False,
    )  # fmt: skip
    params = {**_params(opts), "url_col": url_col, "caption_col": caption_col, "url_list": plan.url_list}
    record = {**compliance.record(), **(plan.staged.checks if plan.staged is not None else {})}
    result.mlflow_run_id = _log_mlflow(settings, result, params, record)
    summary = {**asdict(result), "params": params, "compliance": record, **extra, "finished_at": time.time()}
    storage.write_json_atomic(storage.join(plan.uri, raw.SUCCESS), summary)
    return result


def _retry_failed(plan: _Plan, source: str, settings: Settings, opts: DownloadOptions, url_col, caption_col,
                  compliance: Compliance, check: RowCheck) -> IngestResult:  # fmt: skip
    """Fetch again the complete batch's rows that failed transiently (``tasks.ingest.retry``)."""
    retry.finish_merge(plan.uri)  # one a killed run left half done
    rows = retry.transient_rows(plan.uri)
    if rows is None:
        log.info("%s: no row failed transiently; nothing to retry", plan.uri)
        return _completed(plan, source)
    work = storage.join(plan.uri, retry.RETRY)
    delays = check.sites.crawl_delays() if check.sites is not None else {}
    staged = retry.stage_rows(rows, storage.join(work, "staging"), check, delays)
    sub = _Plan(plan.url_list, plan.batch_id, storage.join(work, "out"), staged)
    n_shards, images_per_s = _fetch_shards(sub, settings, opts, compliance)
    _account(sub, staged, n_shards, opts.shard_size)
    retry.plan_merge(plan.uri, sub.uri)
    retry.finish_merge(plan.uri)
    counts, seen = acc.scan_batch(plan.uri, None)
    previous = _completed(plan, source)
    if len(np.unique(seen)) != len(seen) or len(seen) != previous.rows:
        raise RuntimeError(
            f"retry of {plan.uri}: {len(seen)} rows after the merge for {previous.rows} list rows"
        )
    return _finish(plan, source, settings, opts, counts, images_per_s, url_col, caption_col, compliance,
                   retried={"rows": rows.num_rows, "previous_counts": previous.counts})  # fmt: skip


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


def _params(opts: DownloadOptions) -> dict:
    """The download options as MLflow params (the crawl policy holds the gate's key: never logged)."""
    return {k: v for k, v in asdict(replace(opts, crawl=None)).items() if k != "crawl"}


def _log_mlflow(settings: Settings, result: IngestResult, params: dict, record: dict) -> str:
    from vlforge import tracking

    blocklist = record["blocklist"] or {}
    tags = {
        tracking.TAG_SOURCE: result.source,
        tracking.TAG_RAW_BATCH: result.batch_id,
        tracking.TAG_RAW_BATCH_URI: result.uri,
        tracking.TAG_URL_LIST: result.url_list,
        "vlforge.robots_txt": record["robots_txt"],
        "vlforge.user_agent": record["user_agent"],
        "vlforge.opt_out_lists": ",".join(o["sha256"][:16] for o in record["opt_out_lists"]) or "none",
        "vlforge.blocklist": f"{blocklist['sha256'][:16]} ({blocklist['hashes']} hashes)"
        if blocklist
        else "none",
    }
    run_id = tracking.start_stage_run(
        settings, "ingest", name=f"ingest {result.source}/{result.batch_id}", tags=tags
    )
    metrics = {
        "rows": result.rows,
        "success_rate": result.success_rate,
        "images_per_s": result.images_per_s,
        **tracking.count_metrics({**dict.fromkeys(acc.COMPLIANCE_REASONS, 0), **result.counts}),
    }
    tracking.log_to_run(settings, run_id, params=params, metrics=metrics)
    tracking.log_dict(settings, run_id, {**asdict(result), "mlflow_run_id": run_id}, "ingest_summary.json")
    tracking.log_dict(settings, run_id, record, "compliance.json")
    tracking.end_run(settings, run_id)
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
