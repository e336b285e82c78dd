"""The ``finetune`` stage: ``recipe="lora"`` LoRA-fine-tunes a CLIP (``vlforge-clip-lora``); ``vlm`` or a VLM
recipe instruction-tunes a VLM (``vlforge-vlm-lora``). The recipe name picks the family
(``tasks.train.recipes``)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.train.args import FinetuneArgs, TrainArgs, VlmFinetuneArgs
from tasks.train.driver import TrainResult, run_training
from tasks.train.recipes import recipe_for
from vlforge.settings import Settings

__all__ = ["FinetuneArgs", "TrainResult", "VlmFinetuneArgs", "finetune", "finetune_task"]


def finetune(
    dataset: str,
    settings: Settings,
    args: TrainArgs | None = None,
    *,
    fail_once: dict | None = None,
    **options: Any,
) -> TrainResult:
    """LoRA-fine-tune ``args.base`` (a model URI) on ``dataset`` and register the merged model as
    ``vlforge-clip-lora``; ``recipe="vlm"`` instruction-tunes a VLM instead and registers ``vlforge-vlm-lora``.
    Settings are :class:`FinetuneArgs` or :class:`VlmFinetuneArgs` (``args``, and/or their fields as keywords;
    ``lora_r=4`` sets ``lora.r``); the recipe name picks which."""
    recipe = recipe_for("finetune", args, **options)
    return run_training(recipe, dataset, settings, fail_once=fail_once)


finetune_task = task(name="finetune", retries=0)(finetune)
