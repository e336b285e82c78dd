"""The curate stage: CLIP scoring, filters, dedup and publish of a dataset version, on Ray.

Modules: ``scoring`` (the CLIP scorer on Ray Data, score cache), ``filters`` (the filter units and the in-memory
reference), ``shards`` (one raw shard joined with its scores), ``select`` (top fraction, exact and near dedup
without per-row state in the driver), ``passes`` (the per-shard Ray tasks), ``publish`` (the write pass),
``run`` (the driver of the passes), ``report`` (MLflow and Prefect) and ``stage`` (``curate`` itself).

The entry points are imported lazily: a Ray worker that runs a pass imports ``passes`` and its few
dependencies, not Prefect and MLflow.
"""

from __future__ import annotations

from tasks.lazy import lazy_getattr

_EXPORTS = {
    "CurateResult": "stage",
    "curate": "stage",
    "curate_task": "stage",
    "resolve_filters": "stage",
    "FilterConfig": "filters",
    "FilterConfigError": "filters",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
