"""The recipe names each family offers, and the VLM recipes' stage settings, read from ``models/configs``
without importing any model code (the CLI's help and the registry read them at start-up)."""

from __future__ import annotations

import json
from typing import Any

from vlforge import defaults


def clip_recipes() -> list[str]:
    """The CLIP model recipes (``models/configs/*.json``)."""
    from models.recipes import list_recipes

    return list_recipes()


def vlm_recipes() -> list[str]:
    """The VLM recipes (``models/configs/vlm/*.json``)."""
    return sorted(vlm_recipe_stages())


def vlm_recipe_stages() -> dict[str, dict[str, Any]]:
    """{VLM recipe name: {"stage1": {...}, "stage2": {...}}}: the training settings each recipe sets."""
    from models.recipes import CONFIG_DIR

    out = {}
    for path in sorted((CONFIG_DIR / "vlm").glob("*.json")):
        raw = json.loads(path.read_text())
        out[path.stem] = {"stage1": raw.get("stage1", {}), "stage2": raw.get("stage2", {})}
    return out


def lora_recipes() -> list[str]:
    return ["lora"]


def vlm_finetune_recipes() -> list[str]:
    """``vlm`` (the VLM recipe the base was trained with) and every VLM recipe by name."""
    return [defaults.VLM_FINETUNE_RECIPE, *vlm_recipes()]
