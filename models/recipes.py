"""Model recipes: JSON configs in ``models/configs/`` turned into transformers ``CLIPConfig`` objects (or
:class:`models.convstem.VlforgeClipConfig` when the recipe's ``vision`` names ``stem_channels``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlforge import defaults

CONFIG_DIR = Path(__file__).parent / "configs"
# The recipe a training from scratch gets when none is named (the CLI, the flows, the demo): clip-conv-64, a
# convolutional stem (models/convstem.py) on 64 px images, which learns the shapes clip-tiny's 8 px patchify
# misses (BENCHMARKS.md "Recipes"; vlforge/defaults.py).
DEFAULT_RECIPE = defaults.DEFAULT_RECIPE  # the one default (vlforge/defaults.py)


@dataclass(frozen=True)
class ClipRecipe:
    name: str
    image_size: int
    patch_size: int
    vision: dict[str, Any]
    text: dict[str, Any]
    projection_dim: int
    logit_scale_init_value: float
    tokenizer: dict[str, Any]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    description: str = ""

    @property
    def max_length(self) -> int:
        return int(self.text["max_position_embeddings"])


def list_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> ClipRecipe:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        from vlforge.errors import ModelNotFoundError

        raise ModelNotFoundError(
            f"unknown recipe {name_or_path!r}; known recipes: {', '.join(list_recipes())}"
        )
    raw = json.loads(path.read_text())
    raw["image_mean"] = tuple(raw["image_mean"])
    raw["image_std"] = tuple(raw["image_std"])
    return ClipRecipe(**raw)


def clip_config(recipe: ClipRecipe, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    """The recipe's CLIP config: a conv-stem ``VlforgeClipConfig`` when ``vision`` has ``stem_channels``."""
    from transformers import CLIPConfig

    from models.convstem import VlforgeClipConfig

    config_cls = VlforgeClipConfig if recipe.vision.get("stem_channels") else CLIPConfig
    text = dict(
        recipe.text, vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    vision = dict(recipe.vision, image_size=recipe.image_size, patch_size=recipe.patch_size)
    return config_cls(
        text_config=text,
        vision_config=vision,
        projection_dim=recipe.projection_dim,
        logit_scale_init_value=recipe.logit_scale_init_value,
    )
