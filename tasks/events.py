"""Prefect events where the stages meet: a published dataset version, a registered model, a promoted one.

Other stages react to them through deployment triggers (``vlforge serve --train-on-publish DATASET`` runs the
train deployment on each new version; see ``flows.deployments``), and the Prefect UI's event feed shows them
with the flow run that emitted them (Prefect adds it as a related resource).

- ``vlforge.dataset.published``: resource ``vlforge.dataset.NAME@VERSION`` with labels
  ``vlforge.dataset.name``, ``vlforge.dataset.version`` and ``vlforge.dataset.ref`` (``NAME@VERSION``, what
  the train flow takes); payload: ``counts``, ``content_hash``, ``uri``.
- ``vlforge.model.registered`` / ``vlforge.model.promoted``: resource ``vlforge.model.NAME/VERSION`` with
  labels ``vlforge.model.name``, ``vlforge.model.version``, ``vlforge.model.uri`` (``models:/NAME/VERSION``);
  related: the dataset version it was trained on; payload: the alias and the promotion reason.

Events go to the Prefect API of the flow run (or ``PREFECT_API_URL``); a plain function call outside any flow
with no API configured emits nothing. An event is news, not state: the dataset manifest and the MLflow registry stay the record. So a failure to emit
(no API, a network error) is logged and never fails the stage that already did its work.
"""

from __future__ import annotations

import logging
from typing import Any

DATASET_PUBLISHED = "vlforge.dataset.published"
MODEL_REGISTERED = "vlforge.model.registered"
MODEL_PROMOTED = "vlforge.model.promoted"
DATASET_NAME_LABEL = "vlforge.dataset.name"
DATASET_VERSION_LABEL = "vlforge.dataset.version"
DATASET_REF_LABEL = "vlforge.dataset.ref"

log = logging.getLogger(__name__)


def dataset_resource(name: str, version: str) -> dict[str, str]:
    ref = f"{name}@{version}"
    return {
        "prefect.resource.id": f"vlforge.dataset.{ref}",
        "prefect.resource.name": ref,
        DATASET_NAME_LABEL: name,
        DATASET_VERSION_LABEL: version,
        DATASET_REF_LABEL: ref,
    }


def _listened_to() -> bool:
    """A Prefect API will receive the event: ``PREFECT_API_URL`` is set, or this is a flow run (whose API,
    ephemeral or not, is up). A plain function call with neither would start a throwaway ephemeral server just
    to drop the event."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    return (
        bool(PREFECT_API_URL.value()) or FlowRunContext.get() is not None or TaskRunContext.get() is not None
    )


def _emit(
    event: str, resource: dict[str, str], payload: dict[str, Any], related: list[dict[str, str]] | None = None
):
    try:
        if not _listened_to():
            return None
        from prefect.events import emit_event

        return emit_event(event, resource=resource, payload=payload, related=related or None)
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        log.warning(
            "could not emit the Prefect event %s for %s: %s", event, resource["prefect.resource.id"], exc
        )
        return None


def emit_dataset_published(dv) -> object | None:
    """``vlforge.dataset.published`` for a ``vlforge.datasets.DatasetVersion`` just published."""
    manifest = dv.manifest or {}
    payload = {
        "counts": manifest.get("counts", {}),
        "content_hash": manifest.get("content_hash", ""),
        "uri": dv.uri,
    }
    return _emit(DATASET_PUBLISHED, dataset_resource(dv.name, dv.version), payload)


def _model_resource(name: str, version: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"vlforge.model.{name}/{version}",
        "prefect.resource.name": f"{name} v{version}",
        "vlforge.model.name": name,
        "vlforge.model.version": str(version),
        "vlforge.model.uri": f"models:/{name}/{version}",
    }


def _dataset_related(dataset: str | None, dataset_version: str | None) -> list[dict[str, str]]:
    if not dataset or not dataset_version:
        return []
    return [{**dataset_resource(dataset, dataset_version), "prefect.resource.role": "training-data"}]


def emit_model_registered(
    name: str, version: str, *, alias: str, dataset: str | None = None, dataset_version: str | None = None
) -> object | None:
    """``vlforge.model.registered`` for a new registry version (``alias``: champion or challenger)."""
    return _emit(
        MODEL_REGISTERED,
        _model_resource(name, version),
        {"alias": alias},
        _dataset_related(dataset, dataset_version),
    )


def emit_model_promoted(
    name: str,
    version: str,
    *,
    reason: str = "",
    dataset: str | None = None,
    dataset_version: str | None = None,
) -> object | None:
    """``vlforge.model.promoted``: the version became ``champion``."""
    return _emit(
        MODEL_PROMOTED,
        _model_resource(name, version),
        {"alias": "champion", "reason": reason},
        _dataset_related(dataset, dataset_version),
    )
