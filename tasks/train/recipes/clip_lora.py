"""The CLIP LoRA family: peft LoRA fine-tuning of a registered CLIP; registers the merged model as
``vlforge-clip-lora``.

The recipe: the base model (an alias is pinned to the version it names now) gets LoRA adapters on the attention
projections (and trains the projection heads in full); the driver merges them into the base weights so
transformers loads the registered folder directly, and hands the adapter folder to the registry as well.
"""

from __future__ import annotations

import os
from typing import Any

from tasks.train.args import FinetuneArgs
from tasks.train.driver import Recipe, TrainingRun
from vlforge.settings import Settings


class FinetuneRecipe(Recipe):
    stage = "finetune"

    def __init__(self, args: FinetuneArgs):
        from vlforge.tracking import LORA_MODEL

        super().__init__(args)
        self.model_name = LORA_MODEL
        self.base_model = args.base

    def check(self, settings: Settings) -> None:
        from vlforge.registry import pin_model_uri

        self.base_model = pin_model_uri(self.args.base, settings)

    def params(self) -> dict[str, Any]:
        return {"base_version": self.base_model}

    def initial_model(self, dv, settings: Settings, heldout: float):
        from models.lora import check_targets
        from tasks.common import load_model

        bundle = load_model(self.base_model, settings)
        check_targets(bundle.model, self.args.lora.targets)
        return bundle

    def promotion(self) -> dict[str, Any]:
        """Against its base: it must win on the domain and may lose at most ``general_margin`` on the general
        set (``general_eval``, by default the base's own held-out data)."""
        return {
            "fine_tune": True,
            "general_eval": self.args.general_eval,
            "general_margin": self.args.general_margin,
        }

    def worker_hooks(self):
        from tasks.train.loop import ClipModelHooks

        return ClipModelHooks(lora=self.args.lora)

    def final_model(self, ckpt_dir: str, tr: TrainingRun, model_dir: str) -> tuple[Any, str | None]:
        """Load the base, apply the trained adapter, merge, save the plain CLIP bundle to ``model_dir``."""
        from models.clip import load_clip
        from models.lora import load_adapter, merge_lora
        from tasks.train.data import local_dir

        adapter_dir = os.path.join(ckpt_dir, "adapter")
        bundle = load_clip(local_dir(tr.init_uri))
        bundle.model = merge_lora(load_adapter(bundle.model, adapter_dir, trainable=False))
        bundle.save(model_dir)
        return bundle, adapter_dir
