"""The ``pretrain`` stage: a CLIP recipe trains a CLIP contrastively (``vlforge-clip``); a VLM recipe runs the
VLM's stage 1 (``vlforge-vlm``). The recipe name picks the family (``tasks.train.recipes``)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.train.args import PretrainArgs, TrainArgs, VlmPretrainArgs
from tasks.train.driver import TrainResult, run_training
from tasks.train.recipes import recipe_for
from vlforge.settings import Settings

__all__ = ["PretrainArgs", "TrainResult", "VlmPretrainArgs", "pretrain", "pretrain_task"]


def pretrain(
    dataset: str,
    settings: Settings,
    args: TrainArgs | None = None,
    *,
    fail_once: dict | None = None,
    **options: Any,
) -> TrainResult:
    """Pretrain a CLIP on ``dataset`` (``name[@version]``) and register it as ``vlforge-clip``; a VLM recipe
    (``recipe="vlm-tiny"``) runs the VLM's stage 1 instead and registers ``vlforge-vlm``.

    Settings are :class:`PretrainArgs` or :class:`VlmPretrainArgs` (``args``, and/or their fields as keywords:
    ``epochs=3``); the recipe name picks which."""
    recipe = recipe_for("pretrain", args, **options)
    return run_training(recipe, dataset, settings, fail_once=fail_once)


pretrain_task = task(name="pretrain", retries=0)(pretrain)
