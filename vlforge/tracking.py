"""MLflow for vlforge: tracking set-up, experiments with artifacts under the storage root, lineage inputs/tags,
and every write: runs, params, metrics, artifacts, dataset inputs, models, tags and aliases, from the driver and
from the training workers alike (``tests/unit/test_tracking_writes.py`` holds every other module to it).

One place for the writes keeps their rules in one place: params made safe (:func:`safe_params`), credentials
never printed (:func:`keep_credentials_off_stdout`), artifacts under the storage root, a run's status left as
its owner wants it. Other modules may read through the client :func:`configure` returns.

Call :func:`configure` inside a function (never at import time). Runs created here never write ``./mlruns``:
each experiment's artifact location lives under ``<storage>/mlflow-artifacts``. A write function takes the
settings, or (in a training worker, which has no settings) the tracking URI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from vlforge.settings import Settings

log = logging.getLogger(__name__)

EXPERIMENTS = {
    "ingest": "vlforge-ingest",
    "curate": "vlforge-datasets",
    "datasets": "vlforge-datasets",
    "pretrain": "vlforge-pretrain",
    "finetune": "vlforge-finetune",
    "experiments": "vlforge-experiments",
}
PRETRAINED_MODEL = "vlforge-clip"
LORA_MODEL = "vlforge-clip-lora"
VLM_MODEL = "vlforge-vlm"
VLM_LORA_MODEL = "vlforge-vlm-lora"

# Tags every stage writes (one naming scheme: ``vlforge.<what>``); lineage reads them back.
TAG_STAGE = "vlforge.stage"  # ingest, curate, pretrain, finetune
TAG_SOURCE = "vlforge.source"
TAG_RAW_BATCH = "vlforge.raw_batch"
TAG_RAW_BATCH_URI = "vlforge.raw_batch_uri"
TAG_URL_LIST = "vlforge.url_list"
TAG_DATASET = "vlforge.dataset"
TAG_DATASET_VERSION = "vlforge.dataset_version"
TAG_BASE_MODEL = "vlforge.base_model"
TAG_RECIPE = "vlforge.recipe"
TAG_VISION_MODEL = "vlforge.vision_model"  # a VLM's vision tower: the CLIP it was taken from (pinned)
TAG_TRAIN_NAME = "vlforge.train_name"
TAG_FLOW_RUN = "prefect.flow_run_id"
# Metric names: ``count.<reason>`` for rows per outcome (ingest and curate alike).
METRIC_COUNT_PREFIX = "count."


_INITIALISED: set[str] = set()


def configure(settings: Settings):
    """Point MLflow at the settings' tracking URI and return a client."""
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    keep_credentials_off_stdout(uri)
    _point_at(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if uri.startswith("sqlite:///") and uri not in _INITIALISED:
        _init_sqlite(uri[len("sqlite:///") :], client)
        _INITIALISED.add(uri)
    return client


def _point_at(uri: str) -> None:
    """Point this process's MLflow at ``uri``, leaving the environment as the user left it: mlflow.set_tracking_uri
    also exports MLFLOW_TRACKING_URI (and the registry URI) to os.environ, and a later get_settings() in this
    process (the next command of a session, or a one-worker training's run continued in the driver) would take
    that for the user's choice and keep pointing at this database after VLFORGE_STORAGE changed."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _client(target: Settings | str):
    """The client of ``target``: settings (:func:`configure`), or a tracking URI (a training worker's: the
    driver created the database and the run)."""
    if isinstance(target, Settings):
        return configure(target)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=target, registry_uri=target)


def keep_credentials_off_stdout(tracking_uri: str) -> None:
    """MLflow prints ``View run <name> at: <tracking URI>/#/...`` when a run ends; a URI with credentials
    (``http://user:password@host``) would put the password on the console, so that line is switched off."""
    if redact(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def _init_sqlite(path: str, client) -> None:
    """Create the SQLite schema under a file lock: two processes migrating one new database at once fail."""
    import fcntl

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client.search_experiments(max_results=1)  # runs the migrations if the database is new
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(settings: Settings, stage: str) -> str:
    """Return the id of the stage's experiment, creating it with artifacts under the storage root."""
    client = configure(settings)
    name = EXPERIMENTS.get(stage, stage)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not (settings.mlflow_tracking_uri or "").startswith(("http://", "https://")):
        location = f"{settings.artifact_root}/{name}"
        if not settings.storage_is_remote:
            location = "file://" + location
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def count_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Rows per outcome as metrics: ``{"count.success": 90.0, "count.http_404": 3.0, ...}``."""
    return {f"{METRIC_COUNT_PREFIX}{k}": float(v) for k, v in counts.items()}


def start_stage_run(
    settings: Settings,
    stage: str,
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    dataset=None,
    experiment: str | None = None,
) -> str:
    """Create a stage's MLflow run with the standard tags and return its id: the stage, the Prefect flow run
    (inside one), the dataset version (``dataset``) and ``tags``. The run goes to the stage's experiment, or to
    ``experiment`` (a key of :data:`EXPERIMENTS` or a name). Continue it later by id
    (``mlflow.start_run(run_id=...)`` or the client)."""
    client = configure(settings)
    experiment_id = ensure_experiment(settings, experiment or stage)
    all_tags = {
        TAG_STAGE: stage,
        **flow_run_tags(),
        **(dataset_tags(dataset) if dataset else {}),
        **(tags or {}),
    }
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def log_to_run(
    settings: Settings | str,
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    step: int = 0,
) -> None:
    """Params (made safe: :func:`safe_params`) and metrics in one batch write."""
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    _client(settings).log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[Param(k, v) for k, v in safe_params(params or {}).items()],
    )


def flow_run_tags() -> dict[str, str]:
    """``{"prefect.flow_run_id": id}`` when called inside a Prefect flow run, else ``{}``."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            return {TAG_FLOW_RUN: str(ctx.flow_run.id)}
        tctx = TaskRunContext.get()
        if tctx is not None and tctx.task_run.flow_run_id is not None:
            return {TAG_FLOW_RUN: str(tctx.task_run.flow_run_id)}
    except Exception:
        pass
    env_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    return {TAG_FLOW_RUN: env_id} if env_id else {}


def dataset_tags(dataset_version) -> dict[str, str]:
    return {TAG_DATASET: dataset_version.name, TAG_DATASET_VERSION: dataset_version.version}


def log_dataset_input(
    target: Settings | str, run_id: str, dataset_version, context: str = "training"
) -> None:
    """Log a dataset version as an ``mlflow.data`` input of run ``run_id``; its source is the version's URI.

    The input is a metadata-only dataset (its digest is the manifest's content hash, its kept rows a tag): the
    rows stay in the version's Parquet files, and nothing is inferred from a sample (which warned about
    integer columns)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    manifest = dataset_version.manifest or {}
    rows = str(int(manifest.get("counts", {}).get("kept", 0)))
    ds = meta_dataset(dataset_version.uri, dataset_version.ref, str(manifest.get("content_hash") or "")[:16])
    tags = {MLFLOW_DATASET_CONTEXT: context, "uri": dataset_version.uri, "rows": rows}
    entity = DatasetInput(ds._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])
    _client(target).log_inputs(run_id, datasets=[entity])


def meta_dataset(uri: str, name: str, digest: str | None = None):
    """A metadata-only MLflow dataset whose source is ``uri`` (a dataset version's)."""
    from mlflow.data.meta_dataset import MetaDataset

    uri = uri if "://" in uri else "file://" + uri
    return MetaDataset(_dataset_source(uri), name=name[:500], digest=digest or None)


def _dataset_source(uri: str):
    """The MLflow dataset source of ``uri``. MLflow 3.x registers LocalArtifactDatasetSource twice, so resolving
    a file:// URI by string warns that it "can be interpreted in multiple ways"; take the first source class
    that accepts it instead."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    for source in get_registered_sources():
        try:
            if source._can_resolve(uri):
                return source._resolve(uri)
        except Exception:
            continue
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    return HTTPDatasetSource(uri)


def run_url(settings: Settings, run_id: str) -> str:
    """A link to the run: the MLflow UI when the tracking URI is a server, else the runs:/ URI (never with the
    credentials a tracking URI may carry)."""
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        import mlflow

        run = mlflow.get_run(run_id)
        return redact(f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
    return f"runs:/{run_id}"


def set_run_tags(target: Settings | str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    _client(target).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_dict(target: Settings | str, run_id: str, obj: Any, artifact_file: str) -> None:
    """``obj`` as a JSON (or YAML, by the file's suffix) artifact of the run."""
    _client(target).log_dict(run_id, obj, artifact_file)


def log_files(
    target: Settings | str, run_id: str, files: dict[str, bytes | str], artifact_path: str | None = None
) -> None:
    """Artifacts of the run from memory: ``{file name: content}``, under ``artifact_path``. A file of the same
    name replaces the earlier one (a re-run records again)."""
    client = _client(target)
    with tempfile.TemporaryDirectory(prefix="vlforge-artifacts-") as tmp:
        for name, data in files.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
            client.log_artifact(run_id, path, artifact_path=artifact_path)


def end_run(
    target: Settings | str, run_id: str, status: str = "FINISHED", metrics: dict[str, float] | None = None
) -> None:
    """The run's last metrics, then its end status (FINISHED, FAILED, KILLED)."""
    if metrics:
        log_to_run(target, run_id, metrics=metrics)
    _client(target).set_terminated(run_id, status)


@contextlib.contextmanager
def stage_run(settings: Settings, stage: str, **kwargs) -> Iterator[str]:
    """A stage's run (:func:`start_stage_run`) around a block: FINISHED when the block ends, FAILED (KILLED on
    Ctrl-C) when it raises."""
    run_id = start_stage_run(settings, stage, **kwargs)
    try:
        yield run_id
    except BaseException as exc:
        end_run(settings, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    end_run(settings, run_id)


def continue_run_in_worker(tracking_uri: str, run_id: str, params: dict[str, Any], dataset=None) -> None:
    """Rank 0 of a training continues the driver's run ``run_id`` in this worker process: the run is active
    here (MLflow samples the worker's system metrics into it), with the training's params and dataset input.
    End it with :func:`leave_worker_run`."""
    import mlflow

    keep_credentials_off_stdout(tracking_uri)  # this worker's process prints run links too
    _point_at(tracking_uri)
    # Nested under a run the process has open: a one-worker training runs in the driver's own process.
    mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None, log_system_metrics=True)
    log_to_run(tracking_uri, run_id, params=params)
    if dataset is not None:
        log_dataset_input(tracking_uri, run_id, dataset, "training")


def log_metric_batch(target: Settings | str, run_id: str, metrics: list) -> None:
    """Buffered ``mlflow.entities.Metric`` values (each with its own step) in one write."""
    if metrics:
        _client(target).log_batch(run_id, metrics=metrics)


def leave_worker_run() -> None:
    """End the worker's hold on the run and leave it RUNNING: the driver evaluates, registers and ends it."""
    import mlflow

    mlflow.end_run(status="RUNNING")


def log_pyfunc_model(
    settings: Settings,
    run_id: str,
    *,
    registered_name: str,
    artifacts: dict[str, str],
    model_args: dict[str, Any],
    metrics: dict[str, float],
    eval_dataset=None,
    base_model_id: str | None = None,
):
    """Log a pyfunc model (``model_args``: ``mlflow.pyfunc.log_model``'s) into run ``run_id`` and register it
    as ``registered_name``, with MLflow 3's model links (its eval ``metrics`` against ``eval_dataset``, the
    base model as an input of the run); the run's status is left as it was. Its ``ModelInfo``."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    def log_model():
        info = mlflow.pyfunc.log_model(
            name="model",
            artifacts=artifacts,
            registered_model_name=registered_name,
            await_registration_for=60,
            **model_args,
        )
        mlflow.log_metrics(metrics, model_id=info.model_id, dataset=eval_dataset)
        if base_model_id:
            mlflow.log_input(model=LoggedModelInput(base_model_id))
        return info

    client = configure(settings)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return log_model()
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        info = log_model()
    if status != "FINISHED":  # leaving the context finished the run; its owner finishes it
        client.update_run(run_id, status=status)
    return info


def save_pyfunc_model(path: str, artifacts: dict[str, str], model_args: dict[str, Any]) -> str:
    """The pyfunc model :func:`log_pyfunc_model` logs, saved at ``path`` on disk (no tracking server)."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(path, artifacts=artifacts, **model_args)
    return path


def set_version_tags(settings: Settings, name: str, version: str, tags: dict[str, Any]) -> None:
    client = configure(settings)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


_ALIAS_RACE = ("duplicate key", "unique constraint", "uniqueviolation", "integrityerror")
_ALIAS_TRIES = 5


def set_alias(settings: Settings, name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version``. MLflow's SQL store sets an alias by a read, then an insert or an update
    (``session.merge``), so two processes that set one alias of one model at the same moment can both read "no
    such alias" and the second insert breaks the database's unique key (PostgreSQL: ``UniqueViolation``). The
    alias exists by then, so trying again updates it: the last writer wins, as with one process."""
    import random
    import time

    from mlflow.exceptions import MlflowException

    client = configure(settings)
    for attempt in range(_ALIAS_TRIES):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as exc:
            if attempt == _ALIAS_TRIES - 1 or not any(m in str(exc).lower() for m in _ALIAS_RACE):
                raise
            log.info(
                "alias %s of %s was set by another process at the same moment; trying again", alias, name
            )
            time.sleep(0.05 * (attempt + 1) + random.random() * 0.1)


def delete_alias(settings: Settings, name: str, alias: str) -> None:
    configure(settings).delete_registered_model_alias(name, alias)


_SECRET_NAMES = ("secret", "password", "passwd", "token", "key_id", "access_key", "credential", "api_key")
# scheme://user:password@ (the password may hold a raw "/") or scheme://token@ (no "/" before the "@").
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)(?:[^\s/@:]*:[^\s@]*|[^\s/@]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][^=&\s]*(?:password|passwd|secret|token|signature|credential|api_?key|sig)[^=&\s]*)=[^&\s]+",
    re.IGNORECASE,
)
_MIN_ENV_SECRET = 8  # shorter environment values are too common to redact wherever they occur


def _environment_secrets() -> list[str]:
    """Values of this process's secret-named environment variables (S3 keys, database passwords, tokens)."""
    values = {
        v
        for k, v in os.environ.items()
        if any(n in k.lower() for n in _SECRET_NAMES) and len(v) >= _MIN_ENV_SECRET
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` without credentials: URL user info, secret query parameters, and the value of any secret-named
    environment variable (``AWS_SECRET_ACCESS_KEY``, ``*_PASSWORD``, ``*_TOKEN``...) wherever it appears."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _QUERY_SECRET.sub(r"\g<name>=***", text)
    for secret in _environment_secrets():
        text = text.replace(secret, "***")
    return text


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params fit for MLflow: secret-named keys dropped, credentials inside values redacted (see :func:`redact`),
    values cut to MLflow's 500 characters."""
    return {
        k: redact(str(v))[:500] for k, v in params.items() if not any(b in k.lower() for b in _SECRET_NAMES)
    }
