"""The recaption stage: a VLM writes ``caption_synthetic`` for every row of a dataset version, published as a
new version beside the original ``caption`` (the flywheel's second turn: the VLM trained on curated data rewrites
the captions the next CLIP trains on).

Modules: ``inputs`` (checks before Ray starts), ``generate`` (the Ray Data actor pool and the plain loop it is
measured against) and ``stage`` (``recaption`` itself: resumable publish, MLflow, card). Entry points are imported
lazily, so a Ray worker importing ``generate`` does not import Prefect and MLflow.
"""

from __future__ import annotations

from tasks.lazy import lazy_getattr

_EXPORTS = {
    "RecaptionResult": "stage",
    "recaption": "stage",
    "recaption_task": "stage",
    "RecaptionInputError": "inputs",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
