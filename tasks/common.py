"""Helpers shared by the stages."""

from __future__ import annotations

from vlforge.registry import resolve_model_dir
from vlforge.settings import Settings


def load_model(uri: str, settings: Settings, device: str = "cpu"):
    """Load a :class:`models.clip.ClipBundle` from an MLflow URI, a local folder or a Hugging Face id."""
    from models.clip import load_clip

    return load_clip(resolve_model_dir(uri, settings), device=device)
