"""Lazy re-exports for the stage packages: ``tasks.curate.curate`` imports ``tasks.curate.stage`` on first use, so a
Ray worker that imports one module of a package (a curate pass, the train loop) does not import Prefect and MLflow
through the package's ``__init__``."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that resolves ``name`` from ``<package>.<exports[name]>`` when first asked."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
