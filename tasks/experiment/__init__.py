"""Experiments over the pipeline's own stages: ``curation`` (does CLIP-score filtering pay at equal compute?).

Modules: ``arms`` (which rows each arm keeps, published as dataset versions) and ``curation`` (train, evaluate,
compare, report). Entry points are imported lazily, as in the stage packages."""

from __future__ import annotations

from tasks.lazy import lazy_getattr

_EXPORTS = {
    "CurationExperimentArgs": "curation",
    "run_curation_experiment": "curation",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
