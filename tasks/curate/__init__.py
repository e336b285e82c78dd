"""The curate stage: CLIP scoring, filters, dedup and publish of a dataset version, on Ray.

Modules: ``scoring`` (the CLIP scorer on Ray Data, score cache), ``filters`` (the filter units and the in-memory
reference), ``shards`` (one raw shard joined with its scores), ``select`` (top fraction, exact and near dedup
without per-row state in the driver), ``passes`` (the per-shard Ray tasks), ``publish`` (the write pass),
``run`` (the driver of the passes), ``report`` (MLflow and Prefect) and ``stage`` (``curate`` itself).
"""

from tasks.curate.filters import FilterConfig, FilterConfigError
from tasks.curate.stage import CurateResult, curate, curate_task, resolve_filters

__all__ = ["CurateResult", "FilterConfig", "FilterConfigError", "curate", "curate_task", "resolve_filters"]
