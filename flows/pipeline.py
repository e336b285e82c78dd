"""The flows: ``refresh_dataset`` (ingest new lists, curate, publish), ``train`` (pretrain then LoRA fine-tune)
and ``pipeline`` (both). Thin: they call the stage tasks in order, pass URIs, and publish artifacts."""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger

from flows.params import PipelineParams, RefreshParams, TrainParams
from tasks.curate import curate_task
from tasks.curate.filters import FilterConfig
from tasks.experiment.curation import CurationExperimentArgs
from tasks.ingest import ingest_task
from tasks.train.finetune import finetune_task
from tasks.train.pretrain import pretrain_task
from vlforge import console, defaults, tracking
from vlforge.artifacts import publish
from vlforge.errors import ModelNotFoundError
from vlforge.registry import registered_version
from vlforge.settings import Settings, get_settings


def _logger():
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("vlforge.flows")


def _usable_scorer(settings: Settings, scorer: str | None) -> str | None:
    """The scorer to use; the default champion URI is dropped (with a warning) before any model is registered."""
    if not scorer:
        return None
    if scorer == defaults.DEFAULT_MODEL_URI:
        try:
            registered_version(scorer, settings)
        except ModelNotFoundError:
            console.warn_user(
                f"no {scorer} registered yet: curating with the basic filters only (train a model, then "
                "refresh again)"
            )
            return None
    return scorer


def curate_filters(filters: FilterConfig, scorer: str | None) -> FilterConfig:
    """The form's filters as curate applies them: its one score rule as given, and none without a scorer (an
    empty scorer, or the default champion before one is registered: basic filters only)."""
    return filters if scorer else filters.model_copy(update={"min_score": None, "top_fraction": None})


@flow(name="refresh-dataset", log_prints=True)
def refresh_dataset(params: RefreshParams) -> dict:
    """Ingest the URL lists at ``params.location`` not ingested yet, curate the source, publish a version."""
    settings = get_settings()
    log = _logger()
    if params.recaption_model:  # not a VLM: one clear error before anything is downloaded
        from tasks.recaption.inputs import check_captioner

        check_captioner(params.recaption_model, settings)
    with console.stage(f"ingest {params.location} into source {params.source}"):
        ingested = ingest_task(params.location, params.source, settings, params.ingest)
    new = [r for r in ingested if not r.skipped]
    batch_rows = [
        {
            "url_list": r.url_list,
            "batch": r.batch_id,
            "rows": r.rows,
            "success_rate": r.success_rate,
            "new": not r.skipped,
        }
        for r in ingested
    ]
    scorer = _usable_scorer(settings, params.scorer)
    with console.stage(f"curate source {params.source} into dataset {params.dataset}"):
        result = curate_task(
            params.source,
            params.dataset,
            settings,
            scorer=scorer,
            filters=curate_filters(params.filters, scorer),
        )
    dv = result.dataset_version
    if result.skipped:
        # curate decides "nothing new": same raw batches, same scorer version, same filters as the newest version.
        log.info("nothing new at %s: dataset %s is current", params.location, dv.ref)
        publish(
            "refresh",
            f"Refresh of {params.dataset}: nothing new",
            [
                f"No new URL lists at `{params.location}`; `{dv.ref}` already covers every raw batch with this scorer."
            ],
            {"Raw batches": batch_rows},
        )
        return {"new_batches": len(new), "dataset_version": dv.ref, "skipped": True}
    links = (
        {"MLflow dataset run": tracking.run_url(settings, result.mlflow_run_id)}
        if result.mlflow_run_id
        else {}
    )
    links.update(
        {
            f"MLflow ingest run {r.batch_id}": tracking.run_url(settings, r.mlflow_run_id)
            for r in new
            if r.mlflow_run_id
        }
    )
    recaptioned = None
    if params.recaption_model:  # opt-in: the flywheel's second turn on the new version
        from tasks.recaption import recaption_task

        with console.stage(f"recaption {dv.ref} with {params.recaption_model}"):
            recaptioned = recaption_task(dv.ref, settings, model=params.recaption_model).dataset_version.ref
    publish(
        "refresh",
        f"Refresh of {params.dataset}: published {dv.ref}",
        [f"Dataset version `{dv.ref}` at `{dv.uri}`", f"Scorer: `{scorer or 'none (basic filters only)'}`"],
        {"Raw batches": batch_rows, "Counts": [result.counts]},
        links,
    )
    return {
        "new_batches": len(new),
        "dataset_version": dv.ref,
        "counts": result.counts,
        "mlflow_run_id": result.mlflow_run_id,
        "skipped": False,
        **({"recaptioned_version": recaptioned} if recaptioned else {}),
    }


@flow(name="train", log_prints=True)
def train(params: TrainParams) -> dict:
    """Pretrain CLIP on a dataset version (registers vlforge-clip), then LoRA fine-tune (vlforge-clip-lora);
    with ``vlm_pretrain``/``vlm_finetune``, then the VLM's stage 1 (vlforge-vlm) and stage 2 (vlforge-vlm-lora)."""
    settings = get_settings()
    out: dict = {"dataset": params.dataset}
    rows, links = [], {}
    steps = [  # (stage, label, enabled, task, dataset, settings)
        ("pretrain", "pretrain", params.pretrain, pretrain_task, None, params.pretraining),
        ("finetune", "fine-tune", params.finetune, finetune_task, params.finetune_dataset, params.finetuning),
        ("vlm_pretrain", "VLM pretrain", params.vlm_pretrain, pretrain_task, None, params.vlm_pretraining),
        (
            "vlm_finetune", "VLM fine-tune", params.vlm_finetune, finetune_task, params.vlm_finetune_dataset,
            params.vlm_finetuning,
        ),
    ]  # fmt: skip
    for stage, label, enabled, run, dataset, args in steps:
        if not enabled:
            continue
        dataset = dataset or params.dataset
        what = f"{label} {args.base}" if stage == "finetune" else label
        with console.stage(f"{what} on {dataset}"):
            result = run(dataset, settings, args)
        out[stage] = _train_summary(result)
        rows.append({"stage": stage, **out[stage]})
        links[f"MLflow {label} run"] = tracking.run_url(settings, result.run_id)
    metric_rows = [{"stage": r["stage"], **r.get("metrics", {})} for r in rows]
    publish(
        "train",
        f"Training on {params.dataset}",
        [f"- {r['stage']}: `{r['model_uri']}` ({r['alias'] or 'not registered'})" for r in rows]
        + [f"  - {line.strip()}" for r in rows for line in r["decision"]],
        {
            "Models": [{k: v for k, v in r.items() if k not in ("metrics", "decision")} for r in rows],
            "Metrics": metric_rows,
        },
        links,
    )
    return out


def _train_summary(result) -> dict:
    reg = result.registered
    return {
        "run_id": result.run_id,
        "model_uri": reg.uri if reg else result.model_uri,
        "alias": reg.alias if reg else None,
        "decision": reg.decision.lines() if reg and reg.decision else [],
        "metrics": {k: round(float(v), 4) for k, v in (result.metrics or {}).items()},
    }


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams) -> dict:
    """Refresh the dataset, then train on its newest version."""
    refreshed = refresh_dataset(params.refresh)
    train_params = params.train or TrainParams(dataset=params.refresh.dataset)
    trained = train(train_params)
    return {"refresh": refreshed, "train": trained}


@flow(name="curation-experiment", log_prints=True)
def curation_experiment(params: CurationExperimentArgs) -> dict:
    """Does curation pay? The same recipe for the same samples seen on the pool unfiltered, threshold-filtered
    and top-fraction-filtered, each evaluated with 95% intervals (``vlforge experiment curation``)."""
    from tasks.experiment.curation import run_curation_experiment

    return run_curation_experiment(params, get_settings())
