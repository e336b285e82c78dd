"""The training stages: pretrain (contrastive CLIP) and finetune (LoRA), on one Ray Train driver.

Modules: ``args`` (the typed settings), ``data`` (dataset versions as Ray Data, eval split), ``loop`` (the
per-worker loop and the recipes' worker hooks), ``driver`` (the one driver: resume, Ray Train, MLflow, evaluation,
registration), ``pretrain`` and ``finetune`` (the CLIP recipes), ``vlm`` (the VLM's two stages). See docs/training.md.
The entry points are imported lazily: a Ray Train worker imports ``loop`` without Prefect."""

from __future__ import annotations

from tasks.lazy import lazy_getattr

_EXPORTS = {
    "pretrain": "pretrain",
    "pretrain_task": "pretrain",
    "finetune": "finetune",
    "finetune_task": "finetune",
    "TrainArgs": "args",
    "PretrainArgs": "args",
    "FinetuneArgs": "args",
    "Recipe": "driver",
    "run_training": "driver",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
