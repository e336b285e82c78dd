"""The export stage: a published dataset version as WebDataset tar shards or a ``datasets`` folder.

Modules: ``parts`` (one data part -> its tar shards or Arrow file, a Ray task for large versions) and ``stage``
(``export_dataset``: destination, numbering, manifest, MLflow lineage). Entry points are imported lazily, so a
Ray worker writing a part imports ``parts`` alone.
"""

from __future__ import annotations

_EXPORTS = {
    "ExportArgs": "args",
    "ExportError": "stage",
    "ExportResult": "stage",
    "FORMATS": "args",
    "export_dataset": "stage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
