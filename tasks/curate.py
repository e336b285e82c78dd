"""The curate stage: score a source's raw batches with CLIP on Ray, filter, publish a dataset version.

``curate(source, dataset, settings, scorer=..., min_score=... | top_fraction=...)``:

1. lists the source's complete raw batches (``vlforge.raw``);
2. with a scorer, scores every shard not yet in the score cache (``tasks.scoring``, Ray Data actor pool);
3. reads the pool without image bytes, joins the cached scores/embeddings and runs the filters
   (``tasks.filters``: every dropped row gets one reason and the value that decided it);
4. writes ``data/``, ``rejected/`` and ``embeddings/`` with a :class:`VersionWriter` and publishes the
   manifest last, inside one MLflow run in ``vlforge-datasets`` that logs the version as its output.

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
from tasks.curate_publish import load_candidates, write_version_parts
from tasks.curate_report import log_version_details, prefect_artifacts, start_version_run
from tasks.filters import FilterConfig, FilterConfigError, apply_filters
from tasks.scoring import ScorerInfo, list_shards, score_shards, scorer_identity
from vlforge import raw, storage
from vlforge.datasets import DatasetNotFoundError, DatasetVersion, VersionWriter, resolve_dataset
from vlforge.errors import SourceNotFoundError
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
    if min_score is not None and top_fraction is not None:
        raise FilterConfigError(
            "use either --min-score (an absolute CLIP score threshold) or --top-fraction (keep the best "
            "fraction of the pool), not both"
        )
    config = filters or FilterConfig()
    if min_score is not None:
        config = config.model_copy(update={"min_score": min_score, "top_fraction": None})
    if top_fraction is not None:
        config = config.model_copy(update={"top_fraction": top_fraction, "min_score": None})
    return FilterConfig.model_validate(config.model_dump())


def _fingerprint(batches: list[str], scorer: ScorerInfo | None, config: FilterConfig) -> str:
    payload = {"batches": batches, "scorer": scorer.key if scorer else None, "filters": config.model_dump()}
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
    batch_size: int = 64,
    num_scorers: int | None = None,
    progress: bool | None = None,
    force: bool = False,
    track: bool = True,
) -> CurateResult:
    """Curate ``source``'s raw batches into a new version of ``dataset`` (see the module docstring).

    ``progress``: True/False forces the scoring progress bar on/off (None: on when attached to a terminal).
    ``track``: log the version's MLflow run (on by default).
    """
    config = resolve_filters(filters, min_score, top_fraction)
    if config.needs_scores and not scorer:
        raise FilterConfigError(
            "--min-score, --top-fraction and --near-dup-threshold need CLIP scores: pass --scorer MODEL_URI "
            "(e.g. models:/vlforge-clip@champion)"
        )
    batches = _source_batches(settings, source)
    info, bundle = None, None
    if scorer:
        from tasks.common import load_model

        bundle = load_model(scorer, settings)  # fails early, with one clear message, before Ray starts
        info = scorer_identity(scorer, settings)
    fingerprint = _fingerprint(batches, info, config)
    if not force and (same := _unchanged(settings, dataset, fingerprint)) is not None:
        log.info("dataset %s is up to date with source %s; nothing to publish", same.ref, source)
        m = same.manifest
        return CurateResult(same, dict(m.get("counts", {})), m.get("mlflow_run_id"), skipped=True)
    shards = list_shards(settings, source, batches, info.key if info else UNSCORED)
    scored_rows = 0
    if info is not None:
        pending = [s for s in shards if not storage.exists(s.cache_uri)]
        scored_rows = score_shards(
            pending, scorer, settings, bundle, batch_size, num_scorers, progress=progress
        )
    cand = load_candidates(shards, source, scored=info is not None)
    scores = cand.table.column("clip_score").to_numpy(zero_copy_only=False) if info else None
    decisions = apply_filters(cand.table, config, scores, cand.img_emb)
    counts = decisions.counts()
    writer = VersionWriter(settings, dataset)
    schema = write_version_parts(writer, shards, cand, decisions)
    manifest = {
        "source": source,
        "counts": counts,
        "filters": config.model_dump(),
        "scorer": info.as_dict() if info else None,
        "raw_batches": [{"batch": b, "uri": raw.batch_uri(settings, source, b)} for b in batches],
        "schema": schema,
        "embeddings": {"dim": int(cand.img_emb.shape[1]), "dtype": "float16"}
        if cand.img_emb is not None
        else None,
        "inputs_fingerprint": fingerprint,
    }
    params = {
        "source": source,
        "dataset": dataset,
        "scorer_uri": info.uri if info else "",
        "scorer_name": info.name if info else "",
        "scorer_version": (info.version or "") if info else "",
        "raw_batches": len(batches),
        **{f"filter.{k}": v for k, v in config.model_dump().items()},
    }
    run_id = None
    if track:
        with start_version_run(settings, dataset, source) as run:
            run_id = run.info.run_id
            dv = writer.publish({**manifest, "mlflow_run_id": run_id})
            log_version_details(dv, params, counts, cand, decisions, shards)
    else:
        dv = writer.publish(manifest)
    from vlforge.tracking import run_url

    prefect_artifacts(dv, counts, manifest["scorer"], run_url(settings, run_id) if run_id else None)
    return CurateResult(dv, counts, run_id, skipped=False, scored_rows=scored_rows)


curate_task = task(
    name="curate", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error
)(curate)
