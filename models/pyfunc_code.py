"""The code a registered pyfunc ships: our model modules under one package name that no app uses.

A consumer's process usually has modules of its own called ``models``, ``tasks``, ``flows`` or ``vlforge``
(an app's ``models.py``). MLflow puts a model's code paths at the front of ``sys.path`` and the wrapper would
import ``models.pyfunc``: with our ``models/`` and ``vlforge/`` folders shipped as they are, that fails
(``'models' is not a package``) or swaps the app's modules for ours. So :func:`stage_pyfunc_code` copies the
wrapper's import closure (every module of ``models`` and ``vlforge`` it reaches, at import or at call time)
into ``vlforge_pyfunc_<hash>/models/...`` and ``vlforge_pyfunc_<hash>/vlforge/...``, rewrites those imports to
the new package (with :func:`vlforge.relocate.rewrite_imports`, the rewriter the wheel's build uses too), and
writes a small entry file that MLflow logs as the model's code ("models from code": no pickle). Installed from
the wheel, ``models`` is ``vlforge.models`` and the closure is all under ``vlforge``. The hash is of the
shipped sources, so two models logged by different vlforge versions load side by side in one process. The
weights need none of this: they are ``save_pretrained`` folders.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlforge.relocate import rewrite_imports as _relocate

# The top-level packages the wrapper's closure can reach: `models` and `vlforge` in the repository; from the
# wheel, where this module is `vlforge.models.pyfunc_code`, `vlforge` alone.
SHIPPED_ROOTS = tuple(dict.fromkeys((__name__.partition(".")[0], "vlforge")))
PACKAGE_PREFIX = "vlforge_pyfunc_"
# recipes (JSON) the model code reads next to its modules: `models/configs` (or `vlforge/models/configs`)
DATA_DIRS = {"/".join((*__name__.split(".")[:-1], "configs")): Path(__file__).parent / "configs"}
ENTRY_FILE = "vlforge_model.py"

_ENTRY = '''"""vlforge's {cls}, logged as code; its modules ship in code/{package}/ (models/pyfunc_code.py)."""

import mlflow.models

from {package}.{module} import {cls}

mlflow.models.set_model({cls}())
'''


@dataclass(frozen=True)
class ShippedCode:
    package: str  # vlforge_pyfunc_<hash>
    package_dir: str  # what goes to code_paths
    entry_file: str  # what goes to python_model


def _root(module: str) -> str:
    return module.split(".", 1)[0]


def _module_file(module: str) -> Path | None:
    """The source of ``module``; for a package without ``__init__.py`` (a namespace package, as an editable
    install may present ``models``), the ``__init__.py`` it would have."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin)
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0], "__init__.py") if locations else None


def _imports(path: Path) -> set[str]:
    """The ``models``/``vlforge`` modules ``path`` imports anywhere (function bodies too), with the packages
    those imports pass through."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(_source(path), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _root(a.name) in SHIPPED_ROOTS)
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and _root(node.module or "") in SHIPPED_ROOTS
        ):
            found.add(node.module)
            # `from models import clip` names a submodule, not an attribute
            found.update(
                f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")
            )
    return found


def import_closure(entry_module: str) -> dict[str, Path]:
    """Every ``models``/``vlforge`` module reachable from ``entry_module``, with its packages: name -> file."""
    todo, files = [entry_module], {}
    while todo:
        name = todo.pop()
        if name in files:
            continue
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages on the way
        path = _module_file(name)
        if path is None:
            raise ValueError(f"cannot ship {name!r}: no Python source found for it")
        files[name] = path
        todo.extend(_imports(path))
    return files


def rewrite_imports(source: str, package: str, where: str = "<source>") -> str:
    """``from models.x import y`` -> ``from <package>.models.x import y`` (and so for ``vlforge``) at each
    absolute import statement the parser finds; docstrings and comments stay as they were."""
    return _relocate(source, {root: f"{package}.{root}" for root in SHIPPED_ROOTS}, where=where)


def _relative(name: str, path: Path) -> Path:
    parts = name.split(".")
    return Path(*parts, "__init__.py") if path.name == "__init__.py" else Path(*parts[:-1], path.name)


def stage_pyfunc_code(entry_module: str, class_name: str, dest: str) -> ShippedCode:
    """Write the closure of ``entry_module`` (e.g. ``models.pyfunc``) under ``dest/code/<package>/`` and the
    entry file that sets ``class_name`` as the model at ``dest/vlforge_model.py``."""
    files = import_closure(entry_module)
    data = {d: base for d, base in DATA_DIRS.items() if base.is_dir()}
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + _source(files[name]).encode())
    for d, base in data.items():
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            digest.update(f"{d}/{path.relative_to(base)}".encode() + b"\0" + path.read_bytes())
    package = PACKAGE_PREFIX + digest.hexdigest()[:12]
    package_dir = Path(dest, "code", package)
    package_dir.mkdir(parents=True)
    (package_dir / "__init__.py").write_text(
        f'"""vlforge model code shipped with a pyfunc ({entry_module})."""\n'
    )
    for name, path in files.items():
        target = package_dir / _relative(name, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(rewrite_imports(_source(path), package, where=str(path)))
    for d, base in data.items():
        shutil.copytree(base, package_dir / d, dirs_exist_ok=True)
    entry = Path(dest, ENTRY_FILE)
    entry.write_text(_ENTRY.format(cls=class_name, package=package, module=entry_module))
    return ShippedCode(package=package, package_dir=str(package_dir), entry_file=str(entry))


def _source(path: Path) -> str:
    return path.read_text() if path.is_file() else ""  # a namespace package's missing __init__.py
