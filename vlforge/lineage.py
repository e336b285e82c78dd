"""Lineage over MLflow: the flywheel made visible.

Back from a registered model: the dataset version it was trained on, that version's raw batches and URL lists,
the scorer model that curated it (and the scorer's own chain, recursively), and the base a fine-tune started
from. Forward from a dataset version: every model trained on it, every dataset version those models scored
(curated) and the models trained on those, and the models fine-tuned from them.

The links are the ones every stage records: training runs carry ``vlforge.dataset`` / ``vlforge.dataset_version``
(and ``vlforge.base_model`` for fine-tunes), a dataset manifest lists its raw batches and its ``scorer``
(registry name and version), its curation run in ``vlforge-datasets`` logs ``scorer_name``/``scorer_version``
(a recaptioned version's manifest names its ``recaption.captioner`` and its run logs ``captioner_name``/
``captioner_version`` and ``source_dataset``: the VLM's own chain is walked as the scorer's is),
and each raw batch has one ingest run tagged ``vlforge.raw_batch`` with its ``vlforge.url_list``. A walk stops at
a model or dataset already on its path (a cycle) and at :data:`MAX_DEPTH`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vlforge import tracking
from vlforge.datasets import resolve_dataset
from vlforge.errors import DatasetNotFoundError, ModelNotFoundError
from vlforge.registry import registered_version
from vlforge.settings import Settings

MAX_DEPTH = 8


@dataclass
class ModelLineage:
    model: str  # models:/NAME/VERSION
    run_id: str
    dataset: str | None  # NAME@VERSION it was trained on
    raw_batches: list[str] = field(default_factory=list)
    url_lists: list[str] = field(default_factory=list)
    scorer_uri: str | None = None  # the model that curated the dataset, as curate recorded it
    scorer: ModelLineage | None = None  # that scorer's own lineage, when it is a registered version
    base: ModelLineage | None = None  # the model a fine-tune (or an initialised pretraining) started from
    captioner_uri: str | None = None  # the VLM that wrote its synthetic captions (vlforge recaption)
    captioner: ModelLineage | None = None  # that VLM's own lineage, when it is a registered version
    stopped: str | None = None  # why the walk went no further here (cycle, depth)

    def lines(self, indent: str = "") -> list[str]:
        out = [f"{indent}{self.model} (run {self.run_id}) trained on {self.dataset or '?'}"]
        if self.stopped:
            return [out[0] + f" [{self.stopped}]"]
        out += [f"{indent}  raw batch {b}" for b in self.raw_batches]
        out += [f"{indent}  url list {u}" for u in self.url_lists]
        if self.scorer is not None:
            out.append(f"{indent}  curated by scorer:")
            out += self.scorer.lines(indent + "    ")
        elif self.scorer_uri:
            out.append(f"{indent}  curated by scorer {self.scorer_uri} (not a registered version)")
        if self.captioner is not None:
            out.append(f"{indent}  captions written by:")
            out += self.captioner.lines(indent + "    ")
        elif self.captioner_uri:
            out.append(f"{indent}  captions written by {self.captioner_uri} (not a registered version)")
        if self.base is not None:
            out.append(f"{indent}  base:")
            out += self.base.lines(indent + "    ")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def walk_back(uri: str, settings: Settings, _path: tuple[str, ...] = ()) -> ModelLineage:
    """From a registered model (``models:/NAME@ALIAS`` or ``models:/NAME/N``) back to its URL lists, through
    the scorer that curated its data and the base it started from."""
    mv = registered_version(uri, settings)
    if mv is None:
        raise ModelNotFoundError(f"lineage needs a registered model URI (models:/NAME@ALIAS), got {uri!r}")
    if not mv.run_id:
        raise ModelNotFoundError(
            f"models:/{mv.name}/{mv.version} was registered without an MLflow run (not by vlforge), so it has "
            "no recorded lineage"
        )
    client = tracking.configure(settings)
    tags = client.get_run(mv.run_id).data.tags
    name, version = tags.get(tracking.TAG_DATASET), tags.get(tracking.TAG_DATASET_VERSION)
    out = ModelLineage(model=f"models:/{mv.name}/{mv.version}", run_id=mv.run_id, dataset=None)
    if name and version:
        out.dataset = f"{name}@{version}"
    if out.model in _path or len(_path) >= MAX_DEPTH:
        out.stopped = "cycle: already on this path" if out.model in _path else f"depth limit {MAX_DEPTH}"
        return out
    path = (*_path, out.model)
    if out.dataset:
        try:
            manifest = resolve_dataset(settings, out.dataset).manifest
        except DatasetNotFoundError:
            manifest = {}
        out.raw_batches = [
            b["batch"] if isinstance(b, dict) else b for b in manifest.get("raw_batches") or []
        ]
        out.url_lists = _url_lists(client, out.raw_batches)
        scorer = manifest.get("scorer") or {}
        out.scorer_uri = scorer.get("uri")
        if scorer.get("name") and scorer.get("version"):
            out.scorer_uri = f"models:/{scorer['name']}/{scorer['version']}"
            out.scorer = _walk_or_none(out.scorer_uri, settings, path)
        captioner = (manifest.get("recaption") or {}).get("captioner") or {}
        out.captioner_uri = captioner.get("pinned") or captioner.get("uri")
        if captioner.get("name") and captioner.get("version"):
            out.captioner_uri = f"models:/{captioner['name']}/{captioner['version']}"
            out.captioner = _walk_or_none(out.captioner_uri, settings, path)
    base = tags.get(tracking.TAG_BASE_MODEL)
    if base and base.startswith("models:/"):
        out.base = _walk_or_none(base, settings, path)
    return out


def _walk_or_none(uri: str, settings: Settings, path: tuple[str, ...]) -> ModelLineage | None:
    try:
        return walk_back(uri, settings, path)
    except ModelNotFoundError:  # deleted from the registry since
        return None


def _url_lists(client, batches: list[str]) -> list[str]:
    exp = client.get_experiment_by_name(tracking.EXPERIMENTS["ingest"])
    if exp is None or not batches:
        return []
    lists = []
    for batch in batches:
        query = f"tags.`{tracking.TAG_RAW_BATCH}` = '{batch}'"
        runs = client.search_runs([exp.experiment_id], query, max_results=5)
        lists += [r.data.tags[tracking.TAG_URL_LIST] for r in runs if tracking.TAG_URL_LIST in r.data.tags]
    return sorted(set(lists))


@dataclass
class ModelUse:
    model: str  # models:/NAME/VERSION
    scored: list[DatasetUse] = field(default_factory=list)  # dataset versions it curated
    derived: list[ModelUse] = field(default_factory=list)  # models started from it (fine-tunes)
    captioned: list[DatasetUse] = field(default_factory=list)  # dataset versions it recaptioned


@dataclass
class DatasetUse:
    dataset: str  # NAME@VERSION
    models: list[ModelUse] = field(default_factory=list)  # trained on it
    stopped: str | None = None
    recaptioned: list[DatasetUse] = field(default_factory=list)  # versions recaptioned from it

    def lines(self, indent: str = "") -> list[str]:
        out = [f"{indent}dataset {self.dataset}" + (f" [{self.stopped}]" if self.stopped else "")]
        for m in self.models:
            out += _model_use_lines(m, indent + "  ", "trained on it:")
        for d in self.recaptioned:
            out.append(f"{indent}  recaptioned into:")
            out += d.lines(indent + "    ")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _model_use_lines(use: ModelUse, indent: str, how: str) -> list[str]:
    out = [f"{indent}{how} {use.model}"]
    for d in use.scored:
        out.append(f"{indent}  scored (curated):")
        out += d.lines(indent + "    ")
    for d in use.captioned:
        out.append(f"{indent}  recaptioned:")
        out += d.lines(indent + "    ")
    for m in use.derived:
        out += _model_use_lines(m, indent + "  ", "fine-tuned into")
    return out


def walk_forward(dataset_ref: str, settings: Settings, _path: tuple[str, ...] = ()) -> DatasetUse:
    """From a dataset version to every model trained on it, the datasets those models scored, and on."""
    dv = resolve_dataset(settings, dataset_ref)
    out = DatasetUse(dv.ref)
    if dv.ref in _path or len(_path) >= MAX_DEPTH:
        out.stopped = "cycle: already on this path" if dv.ref in _path else f"depth limit {MAX_DEPTH}"
        return out
    path = (*_path, dv.ref)
    out.models = [_model_use(uri, settings, path) for uri in models_trained_on(dv.ref, settings)]
    # A version recaptioned from this one also shows under the captioning model; here it is reached from its
    # rows as well.
    out.recaptioned = [
        _forward_or_stop(ref, settings, path) for ref in _datasets_by(settings, "source_dataset", dv.ref)
    ]
    return out


def _model_use(uri: str, settings: Settings, path: tuple[str, ...]) -> ModelUse:
    use = ModelUse(uri)
    if uri in path or len(path) >= MAX_DEPTH:
        return use
    path = (*path, uri)
    use.scored = [_forward_or_stop(ref, settings, path) for ref in datasets_scored_by(uri, settings)]
    use.captioned = [_forward_or_stop(ref, settings, path) for ref in datasets_recaptioned_by(uri, settings)]
    use.derived = [_model_use(u, settings, path) for u in models_derived_from(uri, settings)]
    return use


def _forward_or_stop(ref: str, settings: Settings, path: tuple[str, ...]) -> DatasetUse:
    try:
        return walk_forward(ref, settings, path)
    except DatasetNotFoundError:  # removed from storage since
        return DatasetUse(ref, stopped="no longer in storage")


def _experiment_ids(client, stages: tuple[str, ...]) -> list[str]:
    exps = (client.get_experiment_by_name(tracking.EXPERIMENTS[s]) for s in stages)
    return [e.experiment_id for e in exps if e is not None]


def _registered_versions_of(client, run_ids: set[str]) -> list[str]:
    found = []
    for run_id in sorted(run_ids):
        found += [
            f"models:/{mv.name}/{mv.version}" for mv in client.search_model_versions(f"run_id='{run_id}'")
        ]
    return sorted(set(found), key=lambda u: (u.rsplit("/", 1)[0], int(u.rsplit("/", 1)[1])))


def models_trained_on(dataset_ref: str, settings: Settings) -> list[str]:
    """Every registered model version (``models:/NAME/N``) whose training run used this dataset version."""
    dv = resolve_dataset(settings, dataset_ref)
    client = tracking.configure(settings)
    exp_ids = _experiment_ids(client, ("pretrain", "finetune"))
    if not exp_ids:
        return []
    query = f"tags.`{tracking.TAG_DATASET}` = '{dv.name}' and tags.`{tracking.TAG_DATASET_VERSION}` = '{dv.version}'"
    run_ids = {r.info.run_id for r in client.search_runs(exp_ids, query, max_results=1000)}
    return _registered_versions_of(client, run_ids)


def models_derived_from(uri: str, settings: Settings) -> list[str]:
    """Registered versions whose training started from the registered version ``uri`` (its ``base_model``)."""
    client = tracking.configure(settings)
    exp_ids = _experiment_ids(client, ("pretrain", "finetune"))
    if not exp_ids:
        return []
    runs = client.search_runs(exp_ids, f"tags.`{tracking.TAG_BASE_MODEL}` = '{uri}'", max_results=1000)
    return _registered_versions_of(client, {r.info.run_id for r in runs})


def datasets_scored_by(uri: str, settings: Settings) -> list[str]:
    """Dataset versions (``NAME@VERSION``) curated with the registered version ``uri`` as their scorer."""
    mv = registered_version(uri, settings)
    client = tracking.configure(settings)
    exp_ids = _experiment_ids(client, ("datasets",))
    if mv is None or not exp_ids:
        return []
    query = f"params.scorer_name = '{mv.name}' and params.scorer_version = '{mv.version}'"
    refs = set()
    for run in client.search_runs(exp_ids, query, max_results=1000):
        tags = run.data.tags
        if tags.get(tracking.TAG_DATASET) and tags.get(tracking.TAG_DATASET_VERSION):
            refs.add(f"{tags[tracking.TAG_DATASET]}@{tags[tracking.TAG_DATASET_VERSION]}")
    return sorted(refs)


def datasets_recaptioned_by(uri: str, settings: Settings) -> list[str]:
    """Dataset versions (``NAME@VERSION``) whose synthetic captions the registered version ``uri`` wrote."""
    mv = registered_version(uri, settings)
    if mv is None:
        return []
    query = f"params.captioner_name = '{mv.name}' and params.captioner_version = '{mv.version}'"
    return _datasets_by(settings, query=query)


def _datasets_by(settings: Settings, param: str = "", value: str = "", query: str = "") -> list[str]:
    """Dataset versions whose run in ``vlforge-datasets`` has ``param`` = ``value`` (or matches ``query``)."""
    client = tracking.configure(settings)
    exp_ids = _experiment_ids(client, ("datasets",))
    if not exp_ids:
        return []
    refs = set()
    for run in client.search_runs(exp_ids, query or f"params.{param} = '{value}'", max_results=1000):
        tags = run.data.tags
        if tags.get(tracking.TAG_DATASET) and tags.get(tracking.TAG_DATASET_VERSION):
            refs.add(f"{tags[tracking.TAG_DATASET]}@{tags[tracking.TAG_DATASET_VERSION]}")
    return sorted(refs)
