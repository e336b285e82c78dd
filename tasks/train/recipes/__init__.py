"""The recipe families, and how a stage and a recipe name pick one.

A training is a stage (``pretrain`` or ``finetune``: the command, the Prefect task) and a recipe name. The name
picks the family: its settings model (``tasks.train.args``) and its :class:`tasks.train.driver.Recipe` class,
one module per family:

======================  ==========  =====================================  ===================  ==================
family                  stage       recipe names                           settings             module
======================  ==========  =====================================  ===================  ==================
``clip``                pretrain    CLIP recipes (``models/configs``)      ``PretrainArgs``     ``clip``
``vlm-stage1``          pretrain    VLM recipes (``models/configs/vlm``)   ``VlmPretrainArgs``  ``vlm_stage1``
``clip-lora``           finetune    ``lora``                               ``FinetuneArgs``     ``clip_lora``
``vlm-stage2``          finetune    ``vlm`` and the VLM recipes            ``VlmFinetuneArgs``  ``vlm_stage2``
======================  ==========  =====================================  ===================  ==================

The family modules are imported only when a recipe is built (they bring the model code); this module, the
settings and the names (``catalog``) are light, so the CLI derives its options from them at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from tasks.train.args import FinetuneArgs, PretrainArgs, TrainArgs, VlmFinetuneArgs, VlmPretrainArgs
from tasks.train.recipes import catalog
from vlforge.errors import VlforgeError

STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class Family:
    name: str
    stage: str
    label: str  # how help texts and errors name it
    args: type[TrainArgs]
    recipe_class: str  # "module:Class" under tasks.train.recipes
    list_names: Callable[[], list[str]]
    # A name no family of the stage lists goes to this one (its recipe reports the unknown name, unless an
    # ``init`` model makes the name moot).
    fallback: bool = False
    note: str = ""  # said when a setting of another family is given to this one

    def names(self) -> list[str]:
        return self.list_names()

    def recipe(self, args: TrainArgs):
        module, _, cls = self.recipe_class.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(args)

    def settings(self) -> set[str]:
        """The setting names as flat keys (``lora_r`` for ``lora.r``), as the CLI and ``build`` spell them."""
        return set(flat_fields(self.args))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("clip", "pretrain", "CLIP", PretrainArgs, "clip:PretrainRecipe", catalog.clip_recipes, True),
        Family(
            "vlm-stage1", "pretrain", "VLM", VlmPretrainArgs, "vlm_stage1:VlmPretrainRecipe", catalog.vlm_recipes,
            note="a VLM starts from the CLIP named by --vision-model (its vision tower) and the recipe",
        ),
        Family("clip-lora", "finetune", "CLIP", FinetuneArgs, "clip_lora:FinetuneRecipe", catalog.lora_recipes),
        Family(
            "vlm-stage2", "finetune", "VLM", VlmFinetuneArgs, "vlm_stage2:VlmFinetuneRecipe",
            catalog.vlm_finetune_recipes,
            note="a VLM recipe puts LoRA on its language model's projections (the recipe's target_regex) and "
            "trains its adapter in full",
        ),
    )
}  # fmt: skip


def families(stage: str) -> list[Family]:
    """The families of ``stage``, the default (CLIP) first."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return [f for f in FAMILIES.values() if f.stage == stage]


def recipe_names(family: str) -> list[str]:
    """The recipe names of ``family`` (e.g. ``recipe_names("vlm-stage1")``)."""
    return FAMILIES[family].names()


def family_of(stage: str, recipe: str | None) -> Family:
    """The family whose recipes include ``recipe`` (None: the stage's default); one clear error for a name
    that no family of a fine-tune knows."""
    options = families(stage)
    if recipe is None:
        return options[0]
    for family in options:
        if recipe in family.names():
            return family
    for family in options:
        if family.fallback:
            return family
    names = "; ".join(f"{f.label} {f.name}: {', '.join(f.names())}" for f in options)
    raise VlforgeError(f"unknown {stage} recipe {recipe!r}; recipes: {names}")


def family_of_args(args: TrainArgs) -> Family:
    for family in FAMILIES.values():
        if type(args) is family.args:
            return family
    raise TypeError(f"{type(args).__name__} is no family's settings")


def flat_fields(model: type[BaseModel]) -> list[str]:
    """``model``'s field names, a nested model's fields prefixed (``lora_r``)."""
    out = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += [f"{name}_{sub}" for sub in kind.model_fields]
        else:
            out.append(name)
    return out


def given_settings(args: TrainArgs) -> dict[str, Any]:
    """The settings given explicitly to ``args`` (whatever their value), as flat keys."""
    out = {}
    for name in args.model_fields_set:
        value = getattr(args, name)
        if isinstance(value, BaseModel):
            out.update({f"{name}_{sub}": getattr(value, sub) for sub in value.model_fields_set})
        else:
            out[name] = value
    return out


def settings_for(stage: str, args: TrainArgs | None = None, **options: Any) -> TrainArgs:
    """The settings of the family the recipe name picks (``options["recipe"]``, else ``args.recipe`` when given
    explicitly, else ``args``' own family, else the stage's default), from ``args`` and ``options``. Settings of
    another family's kind are one clear error; ``args`` of another family carry over only what was given
    explicitly, so each family's own defaults apply to the rest."""
    given = given_settings(args) if args is not None else {}
    recipe = options.get("recipe", given.get("recipe"))
    if recipe is not None:
        family = family_of(stage, recipe)
    else:
        family = family_of_args(args) if args is not None else families(stage)[0]
    if args is not None and type(args) is family.args:
        _refuse_misplaced(stage, family, recipe, options)
        return family.args.build(args, **options)
    merged = {**given, **options}
    _refuse_misplaced(stage, family, recipe, merged)
    return family.args.build(**merged)


def recipe_for(stage: str, args: TrainArgs | None = None, **options: Any):
    """The :class:`tasks.train.driver.Recipe` a training runs: the family's recipe class on
    :func:`settings_for`'s settings (``recipe_for("pretrain", recipe="vlm-tiny")``)."""
    settings = settings_for(stage, args, **options)
    return family_of_args(settings).recipe(settings)


def _refuse_misplaced(stage: str, family: Family, recipe: str | None, settings: dict[str, Any]) -> None:
    own = family.settings() | {"register"}
    for other in families(stage):
        if other is family:
            continue
        theirs = sorted((set(settings) - own) & other.settings(), key=list(settings).index)
        if theirs:
            flags = " and ".join("--" + k.replace("_", "-") for k in theirs)
            kind = "settings" if len(theirs) > 1 else "setting"
            verb = "are" if len(theirs) > 1 else "is a"
            named = f"recipe {recipe!r} is" if recipe else "the default recipe is"
            why = (
                f": {family.note}" if family.note else f" ({other.label} recipes: {', '.join(other.names())})"
            )
            raise VlforgeError(f"{flags} {verb} {other.label} {kind}; {named} a {family.label} recipe{why}")
