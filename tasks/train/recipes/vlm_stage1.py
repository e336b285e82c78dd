"""The VLM stage-1 family (LLaVA adapter pretraining on image-caption pairs): a new VLM from a VLM recipe
(``models/configs/vlm``) on a CLIP's vision tower, registered as ``vlforge-vlm``. Its data pipeline and worker side
are ``tasks.train.vlm_data``, its evaluation ``tasks.train.vlm_eval`` (see docs/vlm.md)."""

from __future__ import annotations

import os
import shutil
from typing import Any

from tasks.train.args import VlmPretrainArgs
from tasks.train.driver import Recipe, TrainingRun
from tasks.train.vlm_data import VlmModelHooks, dataset_columns, vlm_train_dataset
from tasks.train.vlm_eval import VlmEvaluator
from vlforge.errors import VlforgeError
from vlforge.settings import Settings


def write_versions_file(folder: str) -> None:
    """The transformers, peft and torch versions a VLM folder was saved with."""
    import json

    from models.vlm_train import VERSIONS_FILE, library_versions

    with open(os.path.join(folder, VERSIONS_FILE), "w") as fh:
        json.dump(library_versions(), fh, indent=2)


def version_tags(recipe_name: str, vision_model: str | None) -> dict[str, str]:
    """A registered VLM's tags: library versions, the VLM recipe and (stage 1) the vision tower's CLIP."""
    from models.vlm_train import library_versions
    from vlforge.tracking import TAG_RECIPE, TAG_VISION_MODEL

    tags = {f"vlforge.versions.{k}": v for k, v in library_versions().items()}
    tags[TAG_RECIPE] = recipe_name
    if vision_model:
        tags[TAG_VISION_MODEL] = vision_model
    return tags


class VlmPretrainRecipe(Recipe):
    """LLaVA stage 1: a new VLM from a recipe with the CLIP ``vision_model``'s tower; trains the adapter (and a
    from-scratch language model) on image-caption pairs; registers ``vlforge-vlm``. Settings left empty
    (``lr``, ``batch_size``, ``warmup_steps``) are the recipe's stage-1 values, filled here once."""

    stage = "pretrain"

    def __init__(self, args: VlmPretrainArgs):
        from models.vlm import ADAPTERS, load_vlm_recipe
        from vlforge.tracking import VLM_MODEL

        if args.adapter is not None and args.adapter not in ADAPTERS:
            raise VlforgeError(f"unknown adapter {args.adapter!r}; use one of {', '.join(ADAPTERS)}")
        self.vlm = load_vlm_recipe(args.recipe, adapter=args.adapter)
        super().__init__(args.resolved(self.vlm.stage1))
        self.model_name = VLM_MODEL
        self.vision_model = args.vision_model or self.vlm.vision_model

    def check(self, settings: Settings) -> None:
        from models.convstem import CLIP_MODEL_TYPES
        from vlforge.registry import local_model_type, pin_model_uri

        self.vision_model = pin_model_uri(self.vision_model, settings)
        kind = local_model_type(self.vision_model, settings)
        if kind is not None and kind not in CLIP_MODEL_TYPES:
            raise VlforgeError(f"--vision-model {self.vision_model!r} holds a {kind!r} model, not a CLIP")
        # The vision tower's CLIP is what the VLM starts from: lineage walks back to it.
        self.base_model = self.vision_model

    def params(self) -> dict[str, Any]:
        return {
            "vlm_adapter": self.vlm.adapter,
            "vision_model": self.vision_model,
            "max_length": self.vlm.max_length,
        }

    def tags(self) -> dict[str, str]:
        from vlforge.tracking import TAG_RECIPE, TAG_VISION_MODEL

        return {TAG_RECIPE: self.vlm.name, TAG_VISION_MODEL: self.vision_model}

    def initial_model(self, dv, settings: Settings, heldout: float):
        """The recipe's VLM: the CLIP's vision tower, a new adapter, the language model (a from-scratch one gets
        a tokenizer trained on the train split's text)."""
        from models.vlm import build_vlm
        from tasks.train.data import train_captions

        text_columns = [c for c in ("caption", "prompt", "response") if c in dataset_columns(dv)]
        corpus = train_captions(dv, heldout, columns=text_columns) + [self.vlm.caption_prompt]
        return build_vlm(self.vlm, self.vision_model, corpus, settings=settings, seed=self.args.seed)

    def train_dataset(self, dv, init_uri: str, heldout: float):
        return vlm_train_dataset(
            dv, init_uri, eval_fraction=heldout, caption_prompt=self.vlm.caption_prompt,
            max_length=self.vlm.max_length, seed=self.args.seed,
        )  # fmt: skip

    def worker_hooks(self):
        return VlmModelHooks(
            train_language_model=self.vlm.train_language_model_in_stage1,
            train_vision_tower=self.vlm.train_vision_tower_in_stage1,
        )

    def final_model(self, ckpt_dir: str, tr: TrainingRun, model_dir: str):
        from models.vlm import load_vlm

        shutil.copytree(os.path.join(ckpt_dir, "model"), model_dir, dirs_exist_ok=True)
        write_versions_file(model_dir)
        return load_vlm(model_dir), None

    def evaluator(self, settings: Settings, full: bool = False) -> VlmEvaluator:
        return VlmEvaluator(settings, self.vlm.caption_prompt, full=full)

    def evaluate(self, bundle, eval_refs, settings):
        """Caption accuracy (and its blank-image baseline) on each eval set's images."""
        return self.evaluator(settings, full=True).evaluate_sets(bundle, eval_refs)

    def registration(self, settings: Settings) -> dict[str, Any]:
        return {
            "pyfunc": "vlm",
            "evaluator": self.evaluator(settings),
            "tags": version_tags(self.vlm.name, self.vision_model),
        }
