"""The training commands' options, derived from the settings of every recipe family of the stage.

``vlforge pretrain`` runs a CLIP or a VLM's stage 1, ``vlforge finetune`` a CLIP LoRA or a VLM's stage 2: the
``--recipe`` picks the family (``tasks.train.recipes``), so a command offers the settings of all its families. A
setting every family has with the same default shows that default. Any other (defaults that differ, a setting of
one family only) has no CLI default: its help names each family's default (a VLM's the recipe's own values), and
an option left out takes the chosen family's default, so a value given explicitly is always kept, whatever it
equals.
"""

from __future__ import annotations

import inspect
import typing
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from flows.options import (
    FLAG_NAMES,
    OptionError,
    describe_validation_error,
    field_parameters,
    with_parameters,
)
from tasks.train.args import RECIPE_VALUE
from tasks.train.recipes import Family, families, family_of, settings_for
from tasks.train.recipes.catalog import vlm_recipe_stages


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return "empty" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _family_default(family: Family, key: str, default: Any) -> str:
    """How the help names ``family``'s default of ``key``: its value, or the VLM recipes' values."""
    from_recipe = getattr(family.args, "FROM_RECIPE", {})
    if default is None and key in from_recipe:
        stage = family.args.STAGE
        values = ", ".join(
            f"{name} {_shown(family.args.recipe_value(key, stages[stage]))}"
            for name, stages in vlm_recipe_stages().items()
        )
        return f"the recipe's ({values})"
    return _shown(default)


def _defaults_help(key: str, present: list[tuple[Family, inspect.Parameter]], n_families: int) -> str:
    """``Default: CLIP 8; VLM: the recipe's (vlm-tiny 32, ...).``, or ``VLM recipes only.`` for a setting of one
    family (with its default unless that is empty)."""
    if len(present) < n_families:
        family, param = present[0]
        shown = "" if param.default is None else f"; default {_family_default(family, key, param.default)}"
        return f"{family.label} recipes only{shown}."
    return (
        "Default: " + "; ".join(f"{f.label}: {_family_default(f, key, p.default)}" for f, p in present) + "."
    )


def _recipe_help(options: list[Family]) -> str:
    kinds = "; ".join(f"{f.label} ({f.name}): {', '.join(f.names())}" for f in options)
    return f"Recipe; its name picks the kind of training. {kinds}."


def training_parameters(stage: str) -> list[inspect.Parameter]:
    """One keyword-only parameter per setting of any family of ``stage`` (see the module's docstring)."""
    options = families(stage)
    per = {f.name: {p.name: p for p in field_parameters(f.args)} for f in options}
    keys = list(dict.fromkeys(k for f in options for k in per[f.name]))
    params = []
    for key in keys:
        present = [(f, per[f.name][key]) for f in options if key in per[f.name]]
        first = present[0][1]
        kind, info = typing.get_args(first.annotation)
        text = info.help.removesuffix(RECIPE_VALUE + ".").removesuffix(RECIPE_VALUE)
        defaults = [p.default for _, p in present]
        if key == "recipe":
            default, text = first.default, _recipe_help(options)
        elif len(present) == len(options) and all(d == defaults[0] for d in defaults):
            default = first.default
        else:
            default = None
            kind = kind | None
            text = text.rstrip(".") + ". " + _defaults_help(key, present, len(options))
        names = (FLAG_NAMES[key],) if key in FLAG_NAMES else ()
        option = typer.Option(*names, help=text)
        params.append(
            inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
            )
        )
    return params


def training_options(stage: str):
    """Decorate a command ``fn(..., **options)`` so Typer offers every setting of ``stage``'s families."""

    return with_parameters(lambda: training_parameters(stage))


def collect_training(stage: str, options: dict[str, Any]):
    """The chosen family's settings from the options :func:`training_options` passed: an option left out
    (None) takes the family's default; a value out of range is one :class:`OptionError` naming the option."""
    # Click gives a repeatable option left out as an empty tuple.
    given = {k: v for k, v in options.items() if v is not None and v != () and v != []}
    try:
        return settings_for(stage, **given)
    except ValidationError as exc:
        model = family_of(stage, given.get("recipe")).args
        raise OptionError(describe_validation_error(model, exc)) from None
