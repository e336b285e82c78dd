"""The VLM stage-2 family (LLaVA instruction tuning): LoRA on a VLM's language model and its adapter trained in
full, on rows with a prompt and a response; registers ``vlforge-vlm-lora`` (the merged model plus the adapter).
Its data pipeline and worker side are ``tasks.train.vlm_data``, its evaluation ``tasks.train.vlm_eval``."""

from __future__ import annotations

import os
from typing import Any

from tasks.train.args import VlmFinetuneArgs
from tasks.train.driver import Recipe, TrainingRun
from tasks.train.recipes.catalog import vlm_recipes
from tasks.train.recipes.vlm_stage1 import version_tags
from tasks.train.vlm_data import VlmModelHooks, check_text_columns, vlm_train_dataset
from tasks.train.vlm_eval import VlmEvaluator, load_vlm_model
from vlforge import defaults
from vlforge.datasets import DatasetVersion
from vlforge.errors import VlforgeError
from vlforge.settings import Settings

CLIP_MODEL_NAMES = ("vlforge-clip", "vlforge-clip-lora")


class VlmFinetuneRecipe(Recipe):
    """LLaVA stage 2: instruction tuning of a VLM (``base``, default ``vlforge-vlm@champion``) with LoRA on its
    language model and the adapter trained in full, on rows with ``prompt_col`` and ``response_col``; registers
    ``vlforge-vlm-lora`` (merged, plus the adapter). Promoted only when it beats its base on the held-out
    instructions. ``lr`` and the LoRA rank, alpha and dropout left empty are the VLM recipe's stage-2 values,
    filled in :meth:`check` once the recipe is known (named, or the base's)."""

    stage = "finetune"

    def __init__(self, args: VlmFinetuneArgs):
        from vlforge.tracking import VLM_LORA_MODEL

        super().__init__(args)
        self.model_name = VLM_LORA_MODEL
        self.base_model = args.base
        self.vlm = None  # the VLM recipe: named, or the base's (check)

    def check(self, settings: Settings) -> None:
        from models.vlm import load_vlm_recipe
        from vlforge.registry import local_model_type, pin_model_uri, registered_version

        self.base_model = pin_model_uri(self.args.base, settings)
        mv = registered_version(self.base_model, settings)
        if mv is not None and mv.name in CLIP_MODEL_NAMES:
            raise VlforgeError(
                f"--base {self.args.base!r} is a CLIP ({mv.name}); a VLM fine-tune starts from a VLM, e.g. "
                f"{defaults.DEFAULT_VLM_URI}"
            )
        kind = local_model_type(self.base_model, settings)
        if kind not in (None, "llava"):
            raise VlforgeError(f"--base {self.args.base!r} holds a {kind!r} model, not a VLM (LLaVA)")
        name = self.args.recipe
        if name == defaults.VLM_FINETUNE_RECIPE:
            name = _base_recipe(mv, settings)
            if name is None:
                raise VlforgeError(
                    f"the base {self.args.base!r} records no VLM recipe; name it with --recipe "
                    f"({', '.join(vlm_recipes())})"
                )
        self.vlm = load_vlm_recipe(name)
        # Known only now (the base's recipe): the settings left empty take the recipe's stage-2 values, once.
        self.args = self.args.resolved(self.vlm.stage2)

    def check_dataset(self, dv: DatasetVersion) -> None:
        check_text_columns(
            dv, {self.args.prompt_col: "--prompt-col", self.args.response_col: "--response-col"}
        )

    def params(self) -> dict[str, Any]:
        return {
            "base_version": self.base_model,
            "vlm_recipe": self.vlm.name,
            "max_length": self.vlm.max_length,
            "lora_target_regex": self.lora_settings()["target_regex"],
        }

    def tags(self) -> dict[str, str]:
        from vlforge.tracking import TAG_RECIPE

        return {TAG_RECIPE: self.vlm.name}

    def lora_settings(self) -> dict:
        """``models.vlm_train.LoraSettings`` fields: rank, alpha, dropout as settled in :meth:`check`, the
        recipe's target regex (default: the language model's projections)."""
        from models.vlm_train import LM_LORA_REGEX

        lora = self.args.lora
        return {
            "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_regex": self.vlm.stage2.get("lora", {}).get("target_regex") or LM_LORA_REGEX,
        }  # fmt: skip

    def initial_model(self, dv, settings: Settings, heldout: float):
        return load_vlm_model(self.base_model, settings)

    def train_dataset(self, dv, init_uri: str, heldout: float):
        return vlm_train_dataset(
            dv, init_uri, eval_fraction=heldout, caption_prompt=self.vlm.caption_prompt,
            max_length=self.vlm.max_length, prompt_col=self.args.prompt_col, response_col=self.args.response_col,
            seed=self.args.seed, caption_share=float(self.vlm.stage2.get("caption_share", 0.0)),
        )  # fmt: skip

    def worker_hooks(self):
        return VlmModelHooks(lora=self.lora_settings())

    def final_model(self, ckpt_dir: str, tr: TrainingRun, model_dir: str):
        """The base with the trained adapter, merged (a plain LLaVA folder) into ``model_dir``; the adapter folder
        beside it. Both record the transformers, peft and torch versions."""
        from models.vlm import load_vlm
        from models.vlm_train import resume_stage2, save_stage2
        from tasks.train.data import local_dir

        adapter_dir = model_dir.rstrip("/") + "-adapter"
        bundle = load_vlm(local_dir(tr.init_uri))
        peft_model = resume_stage2(bundle, os.path.join(ckpt_dir, "adapter"), trainable=False)
        return save_stage2(peft_model, bundle, model_dir, adapter_dir), adapter_dir

    def evaluator(self, settings: Settings, full: bool = False) -> VlmEvaluator:
        return VlmEvaluator(
            settings, self.vlm.caption_prompt, self.args.prompt_col, self.args.response_col, full=full
        )

    def evaluate(self, bundle, eval_refs, settings):
        """Instruction accuracy on each eval set whose rows have a prompt and a response (caption accuracy on
        the others), with caption accuracy and the blank-image baselines beside it."""
        evaluator = self.evaluator(settings, full=True)
        return evaluator.evaluate_sets(bundle, [evaluator.instruction_set(ref) for ref in eval_refs])

    def promotion(self) -> dict[str, Any]:
        """Against its base: it must win on the held-out instructions and may lose at most ``general_margin``
        of caption accuracy on the general set (``general_eval``, by default the base's held-out data)."""
        return {
            "fine_tune": True,
            "general_eval": self.args.general_eval,
            "general_margin": self.args.general_margin,
        }

    def registration(self, settings: Settings) -> dict[str, Any]:
        return {
            "pyfunc": "vlm",
            "evaluator": self.evaluator(settings),
            "tags": version_tags(self.vlm.name, None),
        }


def _base_recipe(mv, settings: Settings) -> str | None:
    """The VLM recipe the registered version ``mv`` was trained with (its run's ``vlforge.recipe`` tag)."""
    if mv is None:
        return None
    from vlforge.tracking import TAG_RECIPE, configure

    name = configure(settings).get_run(mv.run_id).data.tags.get(TAG_RECIPE)
    return name if name in vlm_recipes() else None
