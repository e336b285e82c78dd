"""The settings of a training, typed once per recipe family: the Python API, the CLI options and the Prefect
forms derive from them (the families: ``tasks.train.recipes``).

:class:`TrainArgs` holds what every recipe shares (schedule, scale, evaluation, registration). Each family adds
what its recipe needs and sets its own defaults for the shared fields: :class:`PretrainArgs` (CLIP),
:class:`FinetuneArgs` (CLIP LoRA: fewer epochs, no weight decay), :class:`VlmPretrainArgs` (VLM stage 1) and
:class:`VlmFinetuneArgs` (VLM stage 2). In the VLM families a field the VLM recipe sets (``stage1``/``stage2``
of ``models/configs/vlm/*.json``) is ``None`` for "the recipe's value"; :meth:`VlmPretrainArgs.resolved` fills
those once, so a value given explicitly always wins, whatever it equals. A field's ``description`` is its help
text in ``vlforge pretrain --help`` and in the Prefect UI; ``tests/unit/test_train_args.py`` checks that both
show these defaults and texts.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.lora import LoraArgs
from vlforge import defaults
from vlforge.naming import check_name

# Fields whose default differs by recipe: the constraint and the help text are shared, the default is not.
LR_HELP = "Peak AdamW learning rate (cosine schedule)."
BATCH_HELP = "Per-worker batch size."
WARMUP_HELP = "Linear warmup steps before the cosine decay."
EPOCHS_HELP = "Passes over the training split."
Epochs = Annotated[int, Field(gt=0, description=EPOCHS_HELP)]
LearningRate = Annotated[float, Field(gt=0, description=LR_HELP)]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW weight decay.")]
WarmupSteps = Annotated[int, Field(ge=0, description=WARMUP_HELP)]
BatchSize = Annotated[int, Field(gt=1, description=BATCH_HELP)]
# The VLM families' fields that the VLM recipe sets: empty (None) = the recipe's value.
RECIPE_VALUE = "; empty = the VLM recipe's"
RecipeLearningRate = Annotated[float | None, Field(gt=0, description=LR_HELP + RECIPE_VALUE)]
RecipeBatchSize = Annotated[int | None, Field(gt=1, description=BATCH_HELP + RECIPE_VALUE)]
RecipeWarmupSteps = Annotated[int | None, Field(ge=0, description=WARMUP_HELP + RECIPE_VALUE)]
RecipeEpochs = Annotated[int | None, Field(gt=0, description=EPOCHS_HELP + RECIPE_VALUE)]


# Settings that do not change what is trained: a resumed training may take other values.
OPERATIONAL = ("checkpoint_every", "log_every", "max_failures", "register_model", "class_prompts")


class TrainArgs(BaseModel):
    """Settings shared by every recipe (the defaults are pretraining's)."""

    model_config = ConfigDict(extra="forbid")

    epochs: Epochs = 10
    # Pretraining's batch, peak rate and warmup, chosen for the default recipe (clip-conv-64) on the shapes30
    # generator's (vlforge/demo/synth.py) tuning data: small batches give a few hundred pairs enough optimizer
    # steps to learn shapes, and a higher rate tends to stop at colours. Other recipes may want other values
    # (the runs and the settings each recipe was measured at: BENCHMARKS.md "Recipes", bench/recipe.py).
    batch_size: BatchSize = 8
    lr: LearningRate = 5e-4
    weight_decay: WeightDecay = 0.1
    warmup_steps: WarmupSteps = 80
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    grad_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory)."
    )
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    use_gpu: bool | None = Field(None, description="Train on GPUs; empty = use them if the cluster has any.")
    name: str | None = Field(
        None, description="Training name; running the same name again resumes it (default: a new name)."
    )
    checkpoint_every: int = Field(
        50, gt=0, description="Optimizer steps between checkpoints (and every epoch end)."
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the dataset held out for evaluation.")
    min_eval_pairs: int = Field(
        defaults.MIN_EVAL_PAIRS,
        ge=0,
        description="Hold out at least this many pairs (at most half the data): fewer cannot tell models apart.",
    )
    max_eval_pairs: int = Field(
        defaults.MAX_EVAL_PAIRS,
        ge=0,
        description="Hold out at most this many pairs (0: no cap); the rest of a large dataset trains.",
    )
    eval_dataset: str | None = Field(
        None, description="Extra evaluation dataset (NAME or NAME@VERSION); when given it decides promotion."
    )
    class_prompts: list[str] | None = Field(
        None, description="Class prompts for zero-shot accuracy (e.g. 'a photo of a red circle'); repeatable."
    )
    # Not ``register``: that name is pydantic's (ABCMeta's) own; ``build(register=False)`` and the CLI's
    # ``--register/--no-register`` still say it that way.
    register_model: bool = Field(True, description="Register the trained model in the MLflow registry.")
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts from the last checkpoint after a failure."
    )
    seed: int = Field(0, ge=0, description="Random seed of the initial model, augmentation and data order.")
    log_every: int = Field(10, gt=0, description="Optimizer steps between metric writes to MLflow.")

    @field_validator("name")
    @classmethod
    def _name_follows_the_naming_rule(cls, name: str | None) -> str | None:
        # The name becomes the MLflow run name and the checkpoint folder: the one naming rule applies.
        return None if name is None else check_name("training", name, example="'clip-2026-12'")

    @classmethod
    def build(cls, args: TrainArgs | None = None, **options: Any):
        """``args`` with ``options`` applied; ``lora_r=4`` style keys set the nested ``lora`` settings."""
        data = args.model_dump() if args is not None else {}
        if "register" in options:
            options["register_model"] = options.pop("register")
        lora = dict(data.get("lora") or {})
        for key in [k for k in options if k.startswith("lora_")]:
            lora[key[len("lora_") :]] = options.pop(key)
        if lora and "lora" in cls.model_fields:
            data["lora"] = lora
        elif lora:
            raise TypeError(f"{cls.__name__} has no LoRA settings: {sorted(lora)}")
        return cls.model_validate({**data, **options})

    def tracked(self) -> dict[str, Any]:
        """The settings that shape the trained model, as MLflow params: a resume refuses to change any of them.
        ``name`` is the training's identity; the operational settings (:data:`OPERATIONAL`) may change when a
        training is resumed (checkpoint more often, register this time) and are not params."""
        out = self.model_dump(exclude={"name", "lora", *OPERATIONAL})
        lora = getattr(self, "lora", None)
        if isinstance(lora, LoraArgs):
            out.update({f"lora_{k}": v for k, v in lora.to_dict().items()})
            out["lora_targets"] = ",".join(lora.targets)
        elif lora is not None:
            out.update({f"lora_{k}": v for k, v in lora.model_dump().items()})
        return out


class PretrainArgs(TrainArgs):
    """Contrastive CLIP pretraining from a recipe (or from ``init``). The defaults learn colours and shapes of
    a few hundred synthetic pairs on a 2-core machine in well under a minute."""

    recipe: str = Field(
        defaults.DEFAULT_RECIPE, description="Model recipe for training from scratch (models/configs/*.json)."
    )
    init: str | None = Field(
        None, description="Start from this model (MLflow URI, folder, HF id) instead of the recipe."
    )
    caption_col: str = Field(
        "caption",
        description="CLIP recipes: the column of captions to train on (caption_synthetic: the captions "
        "`vlforge recaption` wrote).",
    )
    caption_mix: float | None = Field(
        None,
        ge=0,
        le=1,
        description="CLIP recipes: each sample, each epoch, trains on the synthetic caption (--caption-col, "
        "default caption_synthetic) with this probability, else on the original caption; empty = no mixing.",
    )

    @model_validator(mode="after")
    def _captions_are_for_clip_recipes(self) -> PretrainArgs:
        # A VLM recipe (vlm-*) trains on caption; silently ignoring the caption settings would mislead.
        if self.recipe.startswith("vlm") and (self.caption_col != "caption" or self.caption_mix is not None):
            raise ValueError("caption_col and caption_mix apply to CLIP recipes, not to a VLM recipe")
        return self


class _FinetuneSettings(TrainArgs):
    """What every fine-tune has: a base model, and the general set it may not lose on."""

    general_eval: str | None = Field(
        None,
        description="General eval set the fine-tune may not lose on (NAME or NAME@VERSION); empty = the base's "
        "own held-out data.",
    )
    general_margin: float = Field(
        defaults.GENERAL_MARGIN,
        ge=0,
        description="How much the fine-tune may lose on the general set: promoted only when the lower 95% bound of "
        "its difference from the base there lies above minus this.",
    )
    epochs: Epochs = 5
    batch_size: BatchSize = 32
    # Passes both checks of the fine-tune gate where the base has a foothold on the new domain; higher rates made
    # the default recipe forget general data: BENCHMARKS.md "LoRA defaults", "Under the non-inferiority gate".
    lr: LearningRate = 5e-5
    weight_decay: WeightDecay = 0.0
    warmup_steps: WarmupSteps = 5


class FinetuneArgs(_FinetuneSettings):
    """LoRA fine-tuning of a registered CLIP."""

    recipe: str = Field("lora", description="lora: LoRA on a CLIP's attention projections.")
    base: str = Field(defaults.DEFAULT_MODEL_URI, description="Model to adapt (MLflow URI, folder, HF id).")
    lora: LoraArgs = Field(default_factory=LoraArgs, description="LoRA adapters.")


class _VlmArgs:
    """The VLM families' resolution: ``None`` in a field of :attr:`FROM_RECIPE` means the VLM recipe's value."""

    # field -> its key in the recipe's stage settings (``lora.r``: inside its ``lora`` entry)
    FROM_RECIPE: ClassVar[dict[str, str]] = {}
    STAGE: ClassVar[str] = ""  # "stage1" or "stage2" of models/configs/vlm/*.json
    # Whose default a field takes when the recipe names no value: the CLIP family of the same stage.
    FALLBACK: ClassVar[type[BaseModel]] = TrainArgs

    @classmethod
    def recipe_value(cls, field_name: str, stage: dict[str, Any]) -> Any:
        """The recipe's value of ``field_name`` (``stage``: the recipe's stage settings); when the recipe names
        none, the CLIP family's default."""
        value: Any = stage
        for part in cls.FROM_RECIPE[field_name].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
        if field_name.startswith("lora_"):
            return LoraArgs.model_fields[field_name[len("lora_") :]].default
        return cls.FALLBACK.model_fields[field_name].default

    def resolved(self, stage: dict[str, Any]):
        """These settings with every field left ``None`` (of :attr:`FROM_RECIPE`) set to the recipe's value; a
        value given explicitly is kept, whatever it equals."""
        data = self.model_dump()
        for name in self.FROM_RECIPE:
            group, sub = ("lora", name[len("lora_") :]) if name.startswith("lora_") else (None, name)
            values = data[group] if group else data
            if values[sub] is None:
                values[sub] = self.recipe_value(name, stage)
        return type(self).model_validate(data)  # a recipe's value out of range fails like a given one


class VlmPretrainArgs(_VlmArgs, TrainArgs):
    """LLaVA stage 1: a new VLM from a VLM recipe (``models/configs/vlm``) on a CLIP's vision tower; ``epochs``,
    ``lr``, ``batch_size`` and ``warmup_steps`` left empty are the recipe's stage-1 values."""

    FROM_RECIPE: ClassVar[dict[str, str]] = {
        "epochs": "epochs",
        "lr": "learning_rate",
        "batch_size": "batch_size",
        "warmup_steps": "warmup_steps",
    }
    STAGE: ClassVar[str] = "stage1"

    recipe: str = Field(defaults.DEFAULT_VLM_RECIPE, description="VLM recipe (models/configs/vlm/*.json).")
    vision_model: str | None = Field(
        None,
        description="The CLIP whose vision tower the VLM uses (MLflow URI, folder, HF id); empty = the recipe's "
        "(models:/vlforge-clip@champion).",
    )
    adapter: str | None = Field(None, description="The adapter, mlp or resampler; empty = the recipe's.")
    epochs: RecipeEpochs = None
    batch_size: RecipeBatchSize = None
    lr: RecipeLearningRate = None
    warmup_steps: RecipeWarmupSteps = None


class VlmLoraArgs(BaseModel):
    """LoRA on a VLM's language model: rank, alpha and dropout; empty = the VLM recipe's stage-2 values. The
    modules are the recipe's (``target_regex``, default the language model's projections)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int | None = Field(None, gt=0, description=LoraArgs.model_fields["r"].description + RECIPE_VALUE)
    alpha: int | None = Field(
        None, gt=0, description=LoraArgs.model_fields["alpha"].description + RECIPE_VALUE
    )
    dropout: float | None = Field(
        None, ge=0, lt=1, description=LoraArgs.model_fields["dropout"].description + RECIPE_VALUE
    )


class VlmFinetuneArgs(_VlmArgs, _FinetuneSettings):
    """LLaVA stage 2: instruction tuning of a VLM (LoRA on its language model) on rows with a prompt and a
    response; ``lr`` and the LoRA rank, alpha and dropout left empty are the VLM recipe's stage-2 values."""

    FROM_RECIPE: ClassVar[dict[str, str]] = {
        "lr": "learning_rate",
        "lora_r": "lora.r",
        "lora_alpha": "lora.alpha",
        "lora_dropout": "lora.dropout",
    }
    STAGE: ClassVar[str] = "stage2"
    FALLBACK: ClassVar[type[BaseModel]] = _FinetuneSettings

    recipe: str = Field(
        defaults.VLM_FINETUNE_RECIPE,
        description=f"{defaults.VLM_FINETUNE_RECIPE}: the VLM recipe the base was trained with; or name a VLM "
        "recipe (models/configs/vlm/*.json).",
    )
    base: str = Field(defaults.DEFAULT_VLM_URI, description="VLM to adapt (MLflow URI, folder, HF id).")
    lora: VlmLoraArgs = Field(default_factory=VlmLoraArgs, description="LoRA on the language model.")
    prompt_col: str = Field("prompt", description="The column holding each row's instruction.")
    response_col: str = Field("response", description="The column holding each row's answer.")
    lr: RecipeLearningRate = None
