"""What the wheel holds: the repository's ``models``, ``tasks`` and ``flows`` under the ``vlforge`` package.

The repository keeps its top-level folders (and the editable install that ``make install`` and CI use maps
them as they are), but an installed vlforge must claim one import name only: an app in the same environment
has its own ``models.py`` or ``tasks/``. pyproject.toml configures the project; this file changes only what a
wheel build does (the build backend, ``vlforge_build.py``, sets ``VLFORGE_WHEEL_LAYOUT``):

- the packages ``models...``, ``tasks...``, ``flows...`` become ``vlforge.models...`` etc., read from the same
  folders (``package_dir``), with their package data and the console script's target moved alike;
- each module's absolute imports of those packages, anywhere in the file, and the strings that name one of
  their modules (``"models.pyfunc"`` given to ``importlib``) are rewritten by
  :func:`vlforge.relocate.rewrite_imports`, the rewriter that also ships a registered model's code
  (``models/pyfunc_code.py``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

from vlforge.relocate import relocate_name, rewrite_imports
from vlforge_build import WHEEL_LAYOUT

MOVED = ("models", "tasks", "flows")
ROOTS = {name: f"vlforge.{name}" for name in MOVED}
HERE = Path(__file__).resolve().parent


@functools.cache  # the tree does not change during a build; build_module asks once per module
def _moved_modules() -> frozenset[str]:
    """Every module of the moved packages, by its repository name (``tasks.export.stage``)."""
    names = set()
    for root in MOVED:
        for path in (HERE / root).rglob("*.py"):
            parts = path.relative_to(HERE).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return frozenset(n for n in names if "." in n)


class RelocatingBuildPy(build_py):
    """build_py that rewrites each module it writes for its place under ``vlforge``."""

    def build_module(self, module, module_file, package):
        outfile, copied = super().build_module(module, module_file, package)
        text = Path(outfile).read_text()
        moved = rewrite_imports(text, ROOTS, _moved_modules(), where=str(module_file))
        if moved != text:
            Path(outfile).write_text(moved)
        return outfile, copied


def _entry_points(entry_points: dict) -> dict:
    """The console script's ``flows.main:main`` -> ``vlforge.flows.main:main`` (any of setuptools' forms)."""

    def move(spec: str) -> str:
        name, eq, target = spec.partition("=")
        return f"{name.strip()} = {relocate_name(target.strip(), ROOTS)}" if eq else spec

    out = {}
    for group, specs in entry_points.items():
        if isinstance(specs, dict):
            out[group] = {name: relocate_name(target, ROOTS) for name, target in specs.items()}
        elif isinstance(specs, str):
            out[group] = "\n".join(move(line) for line in specs.splitlines())
        else:
            out[group] = [move(spec) for spec in specs]
    return out


class WheelLayout(Distribution):
    """The distribution pyproject.toml describes, with the moved packages under ``vlforge`` when the build
    backend asks for the wheel's layout."""

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        if not os.environ.get(WHEEL_LAYOUT):
            return
        self.packages = [relocate_name(p, ROOTS) for p in self.packages]
        self.package_dir = {**(self.package_dir or {}), **{new: old for old, new in ROOTS.items()}}
        self.package_data = {relocate_name(p, ROOTS): v for p, v in (self.package_data or {}).items()}
        self.entry_points = _entry_points(self.entry_points or {})
        self.cmdclass = {**self.cmdclass, "build_py": RelocatingBuildPy}


setup(distclass=WheelLayout)
