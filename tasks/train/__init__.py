"""The training stages: pretrain (contrastive CLIP) and finetune (LoRA), on one Ray Train driver.

Modules: ``data`` (dataset versions as Ray Data, eval split), ``loop`` (the per-worker loop), ``driver`` (the
shared driver: resume, Ray Train, MLflow, evaluation, registration), ``pretrain`` and ``finetune`` (the recipes).
The entry points are imported lazily: a Ray Train worker imports ``loop`` without Prefect."""

from __future__ import annotations

_EXPORTS = {
    "pretrain": "pretrain",
    "pretrain_task": "pretrain",
    "finetune": "finetune",
    "finetune_task": "finetune",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"tasks.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tasks.train' has no attribute {name!r}")
