"""The curate stage: score a source's raw batches with CLIP on Ray, filter, publish a dataset version.

``curate(source, dataset, settings, scorer=..., min_score=... | top_fraction=...)``:

1. lists the source's complete raw batches (``vlforge.raw``);
2. with a scorer, scores every shard not yet in the score cache (``tasks.curate.scoring``, Ray Data actor pool);
3. runs the filters as Ray tasks, one per raw shard (``tasks.curate.passes``): the per-row filters, then the
   global decisions without per-row state in the driver (``tasks.curate.select``: exact top-fraction select,
   sha256 shuffle, clustered near dedup);
4. writes ``data/``, ``rejected/`` and ``embeddings/`` parts from Ray tasks (``tasks.curate.publish``) into the
   version's folder and publishes the manifest last, inside one MLflow run in ``vlforge-datasets`` that logs the
   version as its output, and its dataset card (``README.md``, ``tasks.curate.card``) just before the manifest.
   A run killed mid-publish leaves no visible version; the next run of the same inputs resumes that folder
   (finished shards are kept) and removes other abandoned ones (``vlforge gc`` too).

When the newest version was built from the same raw batches, scorer and filters, nothing is published
(``skipped=True``) unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from prefect import task

from tasks.common import retry_unless_user_error
from tasks.curate.card import card_files
from tasks.curate.filters import FilterConfig, FilterConfigError, check_score_rule
from tasks.curate.publish import DONE_DIR
from tasks.curate.report import log_version_details, prefect_artifacts, start_version_run
from tasks.curate.run import run_curation
from tasks.curate.scoring import ScorerInfo, list_shards, score_shards, scorer_identity
from tasks.curate.shards import ShardRef
from vlforge import defaults, raw, storage
from vlforge.datasets import (
    DatasetNotFoundError,
    DatasetRef,
    DatasetVersion,
    open_version,
    resolve_dataset,
    wait_for_writers,
)
from vlforge.errors import SourceNotFoundError, VlforgeError
from vlforge.naming import check_name
from vlforge.settings import Settings

log = logging.getLogger(__name__)
UNSCORED = "unscored"


@dataclass
class CurateResult:
    dataset_version: DatasetVersion
    counts: dict[str, int] = field(default_factory=dict)  # input, kept, rejected, <reason>...
    mlflow_run_id: str | None = None
    skipped: bool = False  # nothing new: the newest version already has these inputs
    scored_rows: int = 0  # pairs scored in this call (0 when every shard was cached)


def resolve_filters(
    filters: FilterConfig | None, min_score: float | None, top_fraction: float | None
) -> FilterConfig:
    check_score_rule(min_score, top_fraction)
    config = filters or FilterConfig()
    if min_score is not None:
        config = config.model_copy(update={"min_score": min_score, "top_fraction": None})
    if top_fraction is not None:
        config = config.model_copy(update={"top_fraction": top_fraction, "min_score": None})
    return FilterConfig.model_validate(config.model_dump())


def _fingerprint(
    batches: list[str],
    scorer: ScorerInfo | None,
    config: FilterConfig,
    evals: list[str] | None = None,
    eval_set: bool = False,
) -> str:
    payload = {"batches": batches, "scorer": scorer.key if scorer else None, "filters": config.model_dump()}
    if evals or eval_set:  # versions curated before decontamination keep their fingerprint
        payload.update({"decontaminated_against": evals or [], "eval_set": eval_set})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _unchanged(settings: Settings, dataset: str, fingerprint: str) -> DatasetVersion | None:
    try:
        latest = resolve_dataset(settings, dataset)
    except DatasetNotFoundError:
        return None
    return latest if latest.manifest.get("inputs_fingerprint") == fingerprint else None


def _source_batches(settings: Settings, source: str) -> list[str]:
    batches = raw.list_raw_batches(settings, source)
    if not batches:
        known = ", ".join(raw.list_sources(settings)) or "none"
        raise SourceNotFoundError(
            f"source {source!r} has no complete raw batches under {raw.raw_root(settings)} (known sources: "
            f"{known}); ingest one first with `vlforge ingest URL_LIST --source {source}`"
        )
    return batches


def curate(
    source: str,
    dataset: str,
    settings: Settings,
    *,
    scorer: str | None = None,
    min_score: float | None = None,
    top_fraction: float | None = None,
    filters: FilterConfig | None = None,
    batch_size: int = defaults.SCORING_BATCH,
    num_scorers: int | None = None,
    progress: bool | None = None,
    force: bool = False,
    track: bool = True,
    allow_empty: bool = False,
    eval_set: bool = False,
) -> CurateResult:
    """Curate ``source``'s raw batches into a new version of ``dataset`` (see the module docstring).

    ``progress``: False turns the console's progress lines off (they show only inside a CLI command).
    ``track``: log the version's MLflow run (on by default).
    ``allow_empty``: publish a version even when the filters kept no row (refused otherwise: an empty version
    would become the dataset's latest).
    ``eval_set``: mark the version an evaluation set (manifest ``eval_set``): later pools are decontaminated
    against it by default, and promotion compares models on it only when their data was.
    """
    check_name("source", source, example="'cc3m'")
    DatasetRef.parse(dataset)
    if batch_size < 1:
        raise FilterConfigError(f"--batch-size must be >= 1 (got {batch_size})")
    config = resolve_filters(filters, min_score, top_fraction)
    if config.needs_scores and not scorer:
        raise FilterConfigError(
            "--min-score, --top-fraction and --near-dup-threshold need CLIP scores: pass --scorer MODEL_URI "
            f"(e.g. {defaults.DEFAULT_MODEL_URI})"
        )
    batches = _source_batches(settings, source)
    info, bundle = None, None
    if scorer:
        from tasks.common import load_model

        bundle = load_model(scorer, settings)  # fails early, with one clear message, before Ray starts
        info = scorer_identity(scorer, settings)
    from tasks.curate.decontam import build_index, eval_set_refs

    evals = eval_set_refs(settings, config.decontaminate_against, dataset)
    fingerprint = _fingerprint(batches, info, config, evals, eval_set)
    if not force:
        wait_for_writers(settings, dataset, fingerprint)  # a curate of the same inputs running now
        if (same := _unchanged(settings, dataset, fingerprint)) is not None:
            return _nothing_new(same, source)
    shards = list_shards(settings, source, batches, info.key if info else UNSCORED)
    scored_rows = 0
    if info is not None:
        pending = [s for s in shards if not storage.exists(s.cache_uri)]
        scored_rows = score_shards(
            pending, scorer, settings, bundle, batch_size, num_scorers, progress=progress
        )
    dim = int(bundle.model.config.projection_dim) if bundle is not None else None
    del bundle
    refs = [
        ShardRef(i, s.batch, s.uri, s.cache_uri if info else None, info.key if info else None)
        for i, s in enumerate(shards)
    ]
    writer, resumed = open_version(settings, dataset, fingerprint)  # waits for a curate of the same inputs
    if not force and (same := _unchanged(settings, dataset, fingerprint)) is not None:
        writer.abandon()  # that curate published what this one would make
        return _nothing_new(same, source)
    if resumed:
        log.info("resuming the unfinished version %s of %s", writer.version, dataset)
    index = build_index(settings, evals) if evals else None
    out = run_curation(refs, source, config, writer, settings, progress=progress, evals=index)
    manifest = {
        "source": source,
        "counts": out.counts,
        "filters": config.model_dump(),
        "scorer": info.as_dict() if info else None,
        "raw_batches": [raw.batch_lineage(settings, source, b) for b in batches],
        "schema": out.schema,
        "embeddings": {"dim": dim, "dtype": "float16"} if info else None,
        "selection": out.selection,
        "compute": {"shards": len(refs), "nodes": out.nodes, "seconds": out.timings},
        "inputs_fingerprint": fingerprint,
        "eval_set": bool(eval_set),
        # The eval versions checked against (promotion reads this) and the rows it dropped.
        "decontamination": {
            "against": evals,
            "eval_images": index.size if index is not None else 0,
            "contaminated": int(out.counts.get("contaminated", 0)),
        },
    }
    if out.licenses:
        manifest["licenses"] = out.licenses
    params = {
        "source": source,
        "dataset": dataset,
        "scorer_uri": info.uri if info else "",
        "scorer_name": info.name if info else "",
        "scorer_version": (info.version or "") if info else "",
        "raw_batches": len(batches),
        "eval_set": bool(eval_set),
        "decontaminated_against": ",".join(evals) or "none",
        **{f"filter.{k}": v for k, v in config.model_dump().items()},
    }
    if not force and (same := _unchanged(settings, dataset, fingerprint)) is not None:
        writer.abandon()  # another curate of the same inputs published while this one ran (object stores)
        return _nothing_new(same, source)
    if not out.counts.get("kept") and not allow_empty:
        writer.abandon()
        raise EmptyVersionError(
            f"the filters kept none of the {out.counts.get('input', 0)} pairs of source {source!r} "
            f"({_top_reasons(out.counts)}), so no version of {dataset!r} was published: loosen the filters, or "
            "pass --allow-empty to publish an empty version (it becomes the dataset's latest)"
        )
    run_id = None
    if track:
        with start_version_run(settings, dataset, source) as run_id:
            dv = writer.publish({**manifest, "mlflow_run_id": run_id}, describe=card_files)
            log_version_details(settings, run_id, dv, params, out)
    else:
        dv = writer.publish(manifest, describe=card_files)
    storage.remove(storage.join(dv.uri, DONE_DIR))
    from vlforge.tracking import run_url

    prefect_artifacts(dv, out.counts, manifest["scorer"], run_url(settings, run_id) if run_id else None)
    from tasks.events import emit_dataset_published

    emit_dataset_published(dv)  # what --train-on-publish triggers on
    return CurateResult(dv, out.counts, run_id, skipped=False, scored_rows=scored_rows)


class EmptyVersionError(VlforgeError):
    """Curation kept no row and publishing an empty version was not asked for."""


def _top_reasons(counts: dict[str, int]) -> str:
    skip = {"input", "kept", "rejected"}
    reasons = sorted(((v, k) for k, v in counts.items() if k not in skip and v), reverse=True)[:3]
    return ", ".join(f"{k}: {v}" for v, k in reasons) or "no reason recorded"


def _nothing_new(same: DatasetVersion, source: str) -> CurateResult:
    log.info("dataset %s is up to date with source %s; nothing to publish", same.ref, source)
    m = same.manifest
    return CurateResult(same, dict(m.get("counts", {})), m.get("mlflow_run_id"), skipped=True)


curate_task = task(
    name="curate", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error
)(curate)
