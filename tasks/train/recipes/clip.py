"""The CLIP pretraining family: contrastive training on a dataset version, evaluated, logged and registered.

The recipe: a new CLIP from a model recipe (``models/configs``) with a tokenizer fitted on the training captions,
or an existing model (``init``); trained in full; registered as ``vlforge-clip``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from tasks.train.args import PretrainArgs
from tasks.train.driver import Recipe, TrainingRun
from vlforge.errors import ModelNotFoundError
from vlforge.settings import Settings


class PretrainRecipe(Recipe):
    stage = "pretrain"

    def __init__(self, args: PretrainArgs):
        from vlforge.tracking import PRETRAINED_MODEL

        if not args.init:
            _check_clip_recipe(args.recipe)
        super().__init__(args)
        self.model_name = PRETRAINED_MODEL
        self.base_model = args.init

    def check(self, settings: Settings) -> None:
        if self.args.init:
            from vlforge.registry import check_model_uri

            check_model_uri(self.args.init, settings)

    def check_dataset(self, dv) -> None:
        from tasks.train.data import CaptionPlan

        CaptionPlan.of(self.args.caption_col, self.args.caption_mix).check(dv)  # a missing column, before Ray

    def train_dataset(self, dv, init_uri: str, heldout: float):
        from tasks.train.data import CaptionPlan, train_dataset

        plan = CaptionPlan.of(self.args.caption_col, self.args.caption_mix)
        return train_dataset(
            dv, init_uri, eval_fraction=heldout, augment=True, seed=self.args.seed, captions=plan
        )

    def tags(self) -> dict[str, str]:
        from vlforge.tracking import TAG_RECIPE

        return {} if self.args.init else {TAG_RECIPE: self.args.recipe}

    def initial_model(self, dv, settings: Settings, heldout: float):
        """From a model URI (``init``), or from scratch: the recipe with a tokenizer fitted on the train captions."""
        args = self.args
        if args.init:
            from tasks.common import load_model

            return load_model(args.init, settings)
        from models.clip import build_clip
        from tasks.train.data import CaptionPlan, train_captions

        # The tokenizer is fitted on every caption the training may draw.
        columns = CaptionPlan.of(args.caption_col, args.caption_mix).columns
        return build_clip(args.recipe, train_captions(dv, heldout, columns=columns), seed=args.seed)

    def worker_hooks(self):
        from tasks.train.loop import ClipModelHooks

        return ClipModelHooks(lora=None)

    def final_model(self, ckpt_dir: str, tr: TrainingRun, model_dir: str) -> tuple[Any, str | None]:
        from models.clip import load_clip

        shutil.copytree(os.path.join(ckpt_dir, "model"), model_dir, dirs_exist_ok=True)
        return load_clip(model_dir), None


def _check_clip_recipe(name: str) -> None:
    from models.recipes import load_recipe
    from tasks.train.recipes.catalog import clip_recipes, vlm_recipes

    try:
        load_recipe(name)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"unknown recipe {name!r}; CLIP recipes: {', '.join(clip_recipes())}; VLM recipes: "
            f"{', '.join(vlm_recipes())}"
        ) from None
