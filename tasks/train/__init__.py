"""The training stages: pretrain (contrastive CLIP, or a VLM's stage 1) and finetune (LoRA on a CLIP, or a VLM's
stage 2), on one Ray Train driver.

Modules: ``args`` (the typed settings of each recipe family), ``recipes`` (the registry: a stage and a recipe name
pick a family; one module per family), ``data`` (dataset versions as Ray Data, eval split), ``loop`` (the
per-worker loop and the CLIP worker hooks), ``vlm_data`` (the VLM's data pipeline and worker hooks), ``vlm_eval``
(the VLM's evaluator), ``driver`` (the one driver: resume, Ray Train, MLflow, evaluation, registration),
``pretrain`` and ``finetune`` (the stages' entry points and Prefect tasks). See docs/training.md.
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
    "VlmPretrainArgs": "args",
    "VlmFinetuneArgs": "args",
    "recipe_for": "recipes",
    "Recipe": "driver",
    "run_training": "driver",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
