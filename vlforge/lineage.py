"""Lineage over MLflow: walk back from a registered model to the URL lists that fed it, and forward from a
dataset version to every model trained on it.

The links are the ones every stage records: training runs carry ``vlforge.dataset`` / ``vlforge.dataset_version``
(and ``vlforge.base_model`` for fine-tunes), a dataset manifest lists its raw batches, and each raw batch has one
ingest run tagged ``vlforge.raw_batch`` with its ``vlforge.url_list``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlforge import tracking
from vlforge.datasets import resolve_dataset
from vlforge.errors import DatasetNotFoundError, ModelNotFoundError
from vlforge.registry import registered_version
from vlforge.settings import Settings


@dataclass
class ModelLineage:
    model: str  # models:/NAME/VERSION
    run_id: str
    dataset: str | None  # NAME@VERSION it was trained on
    raw_batches: list[str] = field(default_factory=list)
    url_lists: list[str] = field(default_factory=list)
    base: ModelLineage | None = None  # the model a fine-tune started from


def walk_back(uri: str, settings: Settings, _depth: int = 0) -> ModelLineage:
    """From a registered model (``models:/NAME@ALIAS`` or ``models:/NAME/N``) back to its URL lists."""
    mv = registered_version(uri, settings)
    if mv is None:
        raise ModelNotFoundError(f"lineage needs a registered model URI (models:/NAME@ALIAS), got {uri!r}")
    client = tracking.configure(settings)
    tags = client.get_run(mv.run_id).data.tags
    name, version = tags.get(tracking.TAG_DATASET), tags.get(tracking.TAG_DATASET_VERSION)
    out = ModelLineage(model=f"models:/{mv.name}/{mv.version}", run_id=mv.run_id, dataset=None)
    if name and version:
        out.dataset = f"{name}@{version}"
        try:
            manifest = resolve_dataset(settings, out.dataset).manifest
        except DatasetNotFoundError:
            manifest = {}
        batches = [b["batch"] if isinstance(b, dict) else b for b in manifest.get("raw_batches") or []]
        out.raw_batches = batches
        out.url_lists = _url_lists(client, settings, batches)
    base = tags.get(tracking.TAG_BASE_MODEL)
    if base and base.startswith("models:/") and _depth < 5:
        try:
            out.base = walk_back(base, settings, _depth + 1)
        except ModelNotFoundError:
            out.base = None
    return out


def _url_lists(client, settings: Settings, batches: list[str]) -> list[str]:
    exp = client.get_experiment_by_name(tracking.EXPERIMENTS["ingest"])
    if exp is None or not batches:
        return []
    lists = []
    for batch in batches:
        runs = client.search_runs([exp.experiment_id], f"tags.`vlforge.raw_batch` = '{batch}'", max_results=5)
        lists += [r.data.tags["vlforge.url_list"] for r in runs if "vlforge.url_list" in r.data.tags]
    return sorted(set(lists))


def models_trained_on(dataset_ref: str, settings: Settings) -> list[str]:
    """Every registered model version (``models:/NAME/N``) whose training run used this dataset version."""
    dv = resolve_dataset(settings, dataset_ref)
    client = tracking.configure(settings)
    exp_ids = [
        e.experiment_id
        for e in (client.get_experiment_by_name(tracking.EXPERIMENTS[s]) for s in ("pretrain", "finetune"))
        if e is not None
    ]
    if not exp_ids:
        return []
    query = f"tags.`{tracking.TAG_DATASET}` = '{dv.name}' and tags.`{tracking.TAG_DATASET_VERSION}` = '{dv.version}'"
    run_ids = {r.info.run_id for r in client.search_runs(exp_ids, query, max_results=1000)}
    found = []
    for name in (tracking.PRETRAINED_MODEL, tracking.LORA_MODEL):
        for mv in client.search_model_versions(f"name='{name}'"):
            if mv.run_id in run_ids:
                found.append(f"models:/{mv.name}/{mv.version}")
    return sorted(found, key=lambda u: (u.rsplit("/", 1)[0], int(u.rsplit("/", 1)[1])))
