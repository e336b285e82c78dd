"""CLI options derived from the pydantic models that define a stage's settings.

``@model_options(PretrainArgs)`` gives a Typer command one ``--option`` per field of the model, with the field's
default and its description as help text, so ``vlforge pretrain --help``, the Prefect UI form (rendered from the
same model) and the Python API cannot drift apart. A nested model (``FinetuneArgs.lora``) becomes prefixed options
(``--lora-r``); the command receives the values as ``**options`` and builds the model with ``Model.build`` or
:func:`collect`.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from vlforge.errors import VlforgeError

# Flag spellings that read better than the field name.
FLAG_NAMES = {
    "use_gpu": "--use-gpu/--no-gpu",
    "register_model": "--register/--no-register",
    "languages": "--language",
    "arms": "--arm",
    "decontaminate_against": "--decontaminate-against",
    "allowed_networks": "--allow-network",
    "opt_out_lists": "--opt-out-list",
}


def _option_type(annotation: Any) -> tuple[Any, bool]:
    """(the type Typer gets, whether the field is a nested model)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, True
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        inner, _ = _option_type(args[0])
        return inner | None, False
    if origin in (list, tuple):
        return list[str], False
    return annotation, False


def field_parameters(model: type[BaseModel], prefix: str = "", exclude: tuple[str, ...] = ()) -> list:
    """One keyword-only ``inspect.Parameter`` per field of ``model`` (nested models flattened with a prefix)."""
    params = []
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        kind, nested = _option_type(info.annotation)
        if nested:
            params += field_parameters(kind, prefix=f"{prefix}{name}_")
            continue
        key = prefix + name
        default = (
            inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
        )
        if isinstance(default, tuple):
            default = list(default)
        names = (FLAG_NAMES[key],) if key in FLAG_NAMES else ()
        option = typer.Option(*names, help=info.description or "")
        params.append(
            inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
            )
        )
    return params


def model_options(model: type[BaseModel], exclude: tuple[str, ...] = ()):
    """Decorate a command ``fn(..., **options)`` so Typer offers every field of ``model`` as an option."""
    return with_parameters(lambda: field_parameters(model, exclude=exclude))


def with_parameters(extra):
    """Decorate a command ``fn(..., **options)`` so Typer sees ``extra()`` (``inspect.Parameter``s, made when
    the command is decorated) in place of ``**options``."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params = own + extra()

        @functools.wraps(fn)
        def command(*args, **kwargs):
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def collect(model: type[BaseModel], options: dict[str, Any]) -> BaseModel:
    """The model from the options :func:`model_options` passed (``lora_r`` -> ``lora.r``); a value out of its
    range is one :class:`OptionError` naming the option as the user typed it."""
    try:
        return model.build(**options) if hasattr(model, "build") else model(**options)
    except ValidationError as exc:
        raise OptionError(describe_validation_error(model, exc)) from None


class OptionError(VlforgeError):
    """An option value out of its range or of the wrong kind."""


def flag_name(key: str) -> str:
    """``top_fraction`` -> ``--top-fraction`` (and the spellings of :data:`FLAG_NAMES`)."""
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-")).split("/")[0]


def _field(model: type[BaseModel], loc: tuple) -> Any:
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return info
        info = fields[part]
        kind, nested = _option_type(info.annotation)
        model = kind if nested else None
    return info


def value_range(info: Any) -> str | None:
    """A field's numeric range from its constraints: ``in (0, 1]``, ``> 0``, ``>= 1``; None without one."""
    bounds = {}
    for meta in getattr(info, "metadata", ()):
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(meta, attr, None) is not None:
                bounds[attr] = getattr(meta, attr)
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]:g}"
    if high:
        return f"{'<' if high[0] == ')' else '<='} {high[1]:g}"
    return None


def _range_words(info: Any) -> str | None:
    """The range as the message says it: the field's own wording (``json_schema_extra["range"]``, e.g. "at
    least 1") or :func:`value_range`, then its unit (``json_schema_extra["unit"]``, e.g. "seconds")."""
    extra = getattr(info, "json_schema_extra", None)
    extra = extra if isinstance(extra, dict) else {}
    limits = extra.get("range") or value_range(info)
    return f"{limits} {extra['unit']}" if limits and extra.get("unit") else limits


def describe_validation_error(model: type[BaseModel], exc: ValidationError) -> str:
    """One line per wrong option: ``--top-fraction must be in (0, 1] (got 1.5)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if isinstance(p, str))
        flag = flag_name("_".join(loc)) if loc else model.__name__
        shown = repr(err.get("input")) if "input" in err else ""
        limits = _range_words(_field(model, loc)) if loc else None
        if limits and err.get("type", "").startswith(("greater_than", "less_than")):
            lines.append(f"{flag} must be {limits} (got {shown})")
        elif err.get("type") == "extra_forbidden":
            lines.append(f"unknown setting {flag}")
        else:
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            msg = msg if msg.startswith(flag + " ") else f"{flag}: {msg}"  # a message that names the option
            lines.append(msg + (f" (got {shown})" if shown and len(shown) < 80 else ""))
    return "; ".join(lines)
