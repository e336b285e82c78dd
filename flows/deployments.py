"""Prefect deployments of the vlforge flows, and ``vlforge serve`` which serves them.

Four deployments, each a :class:`~prefect.deployments.runner.RunnerDeployment` built with
``flow.to_deployment``:

- ``refresh-dataset``: the ``refresh_dataset`` flow on a cron schedule (default 03:00 every day);
- ``train``: the ``train`` flow (pretrain then LoRA fine-tune), run on demand from the UI or the API, and, with
  ``train_on_publish=DATASET`` (``vlforge serve --train-on-publish DATASET``), on each new version of DATASET:
  a deployment trigger on the ``vlforge.dataset.published`` event (``tasks.events``) whose flow run gets
  that version (``NAME@VERSION``) as its dataset parameter;
- ``pipeline``: ``refresh_dataset`` then ``train``, on demand;
- ``curation-experiment``: the ``curation-experiment`` flow (unfiltered vs CLIP-filtered arms), on demand.

Flow parameters are pydantic models, so the Prefect UI renders each deployment's "Run" form with
defaults and validation. The entrypoints are module paths (``flows.pipeline.train``), so flow runs
work wherever vlforge is installed, whatever the working directory.
"""

from __future__ import annotations

from typing import Any

from vlforge import defaults
from vlforge.errors import ServerUnreachableError, VlforgeError
from vlforge.settings import Settings

REFRESH_DEPLOYMENT = "refresh-dataset"
TRAIN_DEPLOYMENT = "train"
PIPELINE_DEPLOYMENT = "pipeline"
EXPERIMENT_DEPLOYMENT = "curation-experiment"
DEFAULT_REFRESH_CRON = defaults.REFRESH_CRON
TAGS = ["vlforge"]


def default_refresh_location(settings: Settings) -> str:
    """Where URL lists land when no location is configured: ``<storage>/incoming``."""
    from vlforge import storage

    return storage.join(settings.storage_uri, "incoming")


def refresh_parameters(
    settings: Settings, location: str | None, source: str | None, dataset: str | None
) -> dict[str, Any]:
    """The ``RefreshParams`` fields the deployments fix; empty values keep the model's defaults."""
    fields = {
        "location": location or default_refresh_location(settings),
        "source": source,
        "dataset": dataset,
    }
    return {k: v for k, v in fields.items() if v}


def _cron_schedule(cron: str, timezone: str | None):
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        raise VlforgeError(
            f"invalid refresh cron {cron!r}: {exc}; use five fields, e.g. '0 3 * * *'"
        ) from exc


def train_on_publish_trigger(dataset: str):
    """A deployment trigger: run the train deployment once per ``vlforge.dataset.published`` event of
    ``dataset``, on the version the event names."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from tasks.events import DATASET_NAME_LABEL, DATASET_PUBLISHED, DATASET_REF_LABEL
    from vlforge.datasets import DatasetRef

    DatasetRef.parse(dataset)  # a dataset name (the naming rule), not a version
    if "@" in dataset:
        raise VlforgeError(f"--train-on-publish takes a dataset name, not a version: {dataset!r}")
    return DeploymentEventTrigger(
        name=f"train on each new version of {dataset}",
        expect={DATASET_PUBLISHED},
        match={DATASET_NAME_LABEL: dataset},
        parameters={"params": {"dataset": "{{ event.resource['" + DATASET_REF_LABEL + "'] }}"}},
    )


def build_deployments(
    settings: Settings,
    *,
    refresh_cron: str = DEFAULT_REFRESH_CRON,
    refresh_location: str | None = None,
    refresh_source: str | None = None,
    refresh_dataset: str | None = None,
    timezone: str | None = None,
    paused: bool = False,
    train_on_publish: str | None = None,
) -> list:
    """The refresh (cron), train, pipeline and curation-experiment deployments, ready for ``prefect.serve``.

    ``refresh_location`` is where URL lists land (folder, glob or ``s3://`` prefix; unset:
    ``<storage>/incoming``), ``refresh_source`` the source name and ``refresh_dataset`` the dataset the
    refresh publishes (unset: ``RefreshParams``' defaults). The pipeline deployment's form starts from the
    same refresh settings. ``train_on_publish``: a dataset name whose new versions run the train deployment
    (:func:`train_on_publish_trigger`). Nothing here contacts the Prefect API.
    """
    from prefect.deployments.runner import EntrypointType

    from flows import pipeline as module

    refresh = refresh_parameters(settings, refresh_location, refresh_source, refresh_dataset)
    common = dict(tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH)
    train_triggers = [train_on_publish_trigger(train_on_publish)] if train_on_publish else []
    return [
        module.refresh_dataset.to_deployment(
            name=REFRESH_DEPLOYMENT,
            schedule=_cron_schedule(refresh_cron, timezone),
            paused=paused,
            parameters={"params": refresh},
            description=f"Ingest new URL lists from {refresh['location']}, curate them, publish a dataset version.",
            **common,
        ),
        module.train.to_deployment(
            name=TRAIN_DEPLOYMENT,
            description="Contrastive pretraining then LoRA fine-tuning on a dataset version; registers both.",
            triggers=train_triggers,
            **common,
        ),
        module.pipeline.to_deployment(
            name=PIPELINE_DEPLOYMENT,
            parameters={"params": {"refresh": refresh}},
            description="Refresh a dataset from its source, then train and register models on it.",
            **common,
        ),
        module.curation_experiment.to_deployment(
            name=EXPERIMENT_DEPLOYMENT,
            description="Does curation pay? Unfiltered vs CLIP-filtered arms of a pool at equal samples seen.",
            **common,
        ),
    ]


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to (``PREFECT_API_URL``), or None for the ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_prefect_api(api_url: str | None = None, timeout: float = 5.0) -> str:
    """Return the API URL after checking that it answers ``/health``; raise ServerUnreachableError if not."""
    import httpx

    url = api_url or prefect_api_url()
    if not url:
        raise ServerUnreachableError(
            "PREFECT_API_URL is not set: `vlforge serve` needs a Prefect server (e.g. `prefect server start`, "
            "then PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ServerUnreachableError(
            f"the Prefect API at {url} does not answer ({type(exc).__name__}: {exc}); start the server "
            "(`prefect server start` or `docker compose up prefect-server`) or fix PREFECT_API_URL"
        ) from exc
    return url


def serve_deployments(
    settings: Settings,
    *,
    refresh_cron: str = DEFAULT_REFRESH_CRON,
    refresh_location: str | None = None,
    refresh_source: str | None = None,
    refresh_dataset: str | None = None,
    timezone: str | None = None,
    limit: int | None = None,
    api_url: str | None = None,
    train_on_publish: str | None = None,
) -> None:
    """Serve the deployments to the Prefect server at ``PREFECT_API_URL`` (or ``api_url``) until stopped.

    Blocks; flow runs execute in subprocesses of this process. Schedules stay active on shutdown
    (``pause_on_shutdown=False``) so a restart of the container does not silently stop the refresh.
    """
    import os

    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = check_prefect_api(api_url)
    # Flow runs execute in subprocesses: they must report to the same API.
    os.environ["PREFECT_API_URL"] = url
    deployments = build_deployments(
        settings,
        refresh_cron=refresh_cron,
        refresh_location=refresh_location,
        refresh_source=refresh_source,
        refresh_dataset=refresh_dataset,
        timezone=timezone,
        train_on_publish=train_on_publish,
    )
    with temporary_settings(updates={PREFECT_API_URL: url}):
        prefect.serve(*deployments, pause_on_shutdown=False, limit=limit)
