"""Helpers shared by the stages."""

from __future__ import annotations

from vlforge.registry import resolve_model_dir
from vlforge.settings import Settings


def load_model(uri: str, settings: Settings, device: str = "cpu"):
    """Load a :class:`models.clip.ClipBundle` from an MLflow URI, a local folder or a Hugging Face id."""
    from models.clip import load_clip

    return load_clip(resolve_model_dir(uri, settings), device=device)


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures (storage, network, Ray), never a user's
    mistake (a :class:`~vlforge.errors.VlforgeError`: retrying a bad URL list or an unknown model cannot help)."""
    from vlforge.errors import VlforgeError

    try:
        state.result()
    except VlforgeError:
        return False
    except Exception:
        return True
    return False


def typed_args(model, args=None, options: dict | None = None, error: type[Exception] | None = None):
    """``model`` from ``args`` (an instance, or None for the defaults) with ``options`` applied by field name,
    for Python callers of a stage: a bad value is one ``error`` (a VlforgeError: a user's mistake, never
    retried), ``shard_size: Input should be greater than or equal to 1 (got 0)``. The CLI validates first and
    names the option as typed (``flows.options.collect``)."""
    from pydantic import ValidationError

    from vlforge.errors import VlforgeError

    data = args.model_dump() if args is not None else {}
    try:
        return model.model_validate({**data, **(options or {})})
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        raise (error or VlforgeError)("; ".join(lines)) from None
