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
