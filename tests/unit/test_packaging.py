"""vlforge installs under one import name: the wheel holds ``models``, ``tasks`` and ``flows`` as
``vlforge.models``, ``vlforge.tasks`` and ``vlforge.flows`` (setup.py, vlforge_build.py), so an app with its
own ``models.py``, ``tasks/`` and ``flows/`` keeps them, and the installed console script and stages work.

The installed copy runs in ``python -I -S`` with ``sys.path`` set by hand (the app, the install target, the
environment's site-packages): neither the repository nor its editable install can stand in for it."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from vlforge.relocate import relocate_name, rewrite_imports

ROOT = Path(__file__).resolve().parents[2]
MOVED = ("models", "tasks", "flows")
ROOTS = {name: f"vlforge.{name}" for name in MOVED}
NOT_SOURCES = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".vlforge*",
    "mlruns",
    "mlartifacts",
)
NOT_SOURCES += (".pytest_cache", ".ruff_cache", "tests", "bench", "infra", "docs")


def test_rewrite_moves_imports_and_module_strings_only():
    source = textwrap.dedent(
        '''
        """import models and "tasks.export.stage" in a docstring stay."""
        import os, models.clip as mc  # é: columns are bytes
        import models
        from tasks.export import (
            stage,
        )
        from .sibling import x


        def f():
            from flows.cli import app
            return "tasks.export.stage", f"tasks.{x}", "tasks", "models.unknown"
        '''
    )
    out = rewrite_imports(source, ROOTS, modules={"tasks.export.stage"})
    assert "import os, vlforge.models.clip as mc  # é" in out
    assert "\nfrom vlforge import models\n" in out
    assert "from vlforge.tasks.export import (\n    stage,\n)" in out
    assert "    from vlforge.flows.cli import app" in out
    assert 'return \'vlforge.tasks.export.stage\', f"tasks.{x}", "tasks", "models.unknown"' in out
    assert '"""import models and "tasks.export.stage" in a docstring stay."""' in out
    assert "from .sibling import x" in out
    ast.parse(out)


def test_rewrite_refuses_an_import_it_cannot_move():
    with pytest.raises(ValueError, match="import models.clip"):
        rewrite_imports("import models.clip\n", ROOTS)


def test_relocate_name_moves_entry_points_and_leaves_others():
    assert relocate_name("flows.main:main", ROOTS) == "vlforge.flows.main:main"
    assert relocate_name("vlforge.errors", ROOTS) == "vlforge.errors"
    assert relocate_name("modelsx.y", ROOTS) == "modelsx.y"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the repository's sources: a build writes build/ and egg-info next to them."""
    src = tmp_path_factory.mktemp("build") / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    return src


@pytest.fixture(scope="module")
def wheel(source) -> Path:
    out = source.parent / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (path,) = out.glob("vlforge-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


@pytest.mark.slow
def test_wheel_claims_the_vlforge_name_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        assert {n.split("/")[0] for n in names} == {"vlforge", dist_info}
        assert z.read(f"{dist_info}/top_level.txt").decode().split() == ["vlforge"]
        assert "vlforge = vlforge.flows.main:main" in z.read(f"{dist_info}/entry_points.txt").decode()
        assert {"vlforge/models/configs/clip-tiny.json", "vlforge/tasks/export/stage.py"} <= set(names)
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    stray = []  # any import of the top-level names left in the installed code
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in MOVED:
                stray.append(f"{name}: from {node.module}")
            elif isinstance(node, ast.Import):
                stray += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] in MOVED]
    assert not stray
    assert (
        "'vlforge.models.pyfunc'" in sources["vlforge/tasks/register.py"]
    )  # a module path given to importlib


EDITABLE = """
import sys, vlforge_build
out = sys.argv[1]  # setuptools' hooks rewrite sys.argv
meta = vlforge_build.prepare_metadata_for_build_editable(out)
print(vlforge_build.build_editable(out, metadata_directory=f"{out}/{meta}"))
"""


@pytest.mark.slow
def test_editable_install_keeps_the_repository_names(source):
    """What `make install` and CI get (`pip install -e`): the folders mapped as they are, the same script."""
    out = source.parent / "editable"
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", EDITABLE, str(out)], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with zipfile.ZipFile(out / run.stdout.strip().splitlines()[-1]) as z:
        names = z.namelist()
        finder = next(z.read(n).decode() for n in names if n.endswith("_finder.py"))
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    mapping = ast.literal_eval(finder.split("MAPPING: dict[str, str] = ", 1)[1].splitlines()[0])
    assert mapping == {name: str(source / name) for name in ("flows", "models", "tasks", "vlforge")}
    assert "vlforge = flows.main:main" in entry_points


APP = {
    "models.py": "KIND = 'app models'\n",
    "tasks/__init__.py": "KIND = 'app tasks'\n",
    "flows/__init__.py": "KIND = 'app flows'\n",
}


def _isolated(installed: Path, app: Path, code: str, *args: str, env: dict | None = None):
    """``code`` in ``python -I -S`` whose sys.path is the app, the install target and site-packages only."""
    paths = [str(app), str(installed), sysconfig.get_paths()["purelib"]]
    prelude = f"import sys; sys.path[:] = {paths!r} + [p for p in sys.path if 'site-packages' not in p]\n"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code, *args],
        cwd=app,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


APP_MAIN = """
import json, sys
import models, tasks, flows
mine = {n: sys.modules[n] for n in ("models", "tasks", "flows")}
import vlforge, vlforge.flows.cli
from vlforge.demo.datasets import publish_synthetic_dataset
from vlforge.models.pyfunc_code import SHIPPED_ROOTS, stage_pyfunc_code
from vlforge.settings import Settings
from vlforge.tasks.export import ExportArgs

dv, _ = publish_synthetic_dataset(Settings(), "synth", n=6)
code = stage_pyfunc_code("vlforge.models.pyfunc", "ClipPyfunc", sys.argv[1])
print(json.dumps({
    "vlforge": vlforge.__file__,
    "kinds": [m.KIND for m in mine.values()],
    "same_modules": all(sys.modules[n] is m for n, m in mine.items()),
    "ours_under_top_level_names": sorted(
        n for n in sys.modules if n.split(".")[0] in mine and sys.modules[n] is not mine.get(n)
    ),
    "version": dv.version,
    "export_args": ExportArgs.__module__,
    "shipped_roots": list(SHIPPED_ROOTS),
    "code": code.package_dir,
}))
"""

RUN_SCRIPT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.mark.slow
def test_installed_vlforge_runs_beside_an_apps_own_modules(installed, tmp_path):
    app = tmp_path / "app"
    for rel, text in APP.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    env = {"VLFORGE_STORAGE": str(tmp_path / "store")}

    run = _isolated(installed, app, APP_MAIN, str(tmp_path / "pyfunc"), env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["vlforge"].startswith(str(installed))
    assert out["kinds"] == ["app models", "app tasks", "app flows"] and out["same_modules"]
    assert out["ours_under_top_level_names"] == []
    assert out["export_args"] == "vlforge.tasks.export.args"  # the lazy export resolves under vlforge
    # a registered model's code staged from the installed layout: all under vlforge_pyfunc_<hash>/vlforge
    assert out["shipped_roots"] == ["vlforge"]
    shipped = Path(out["code"])
    assert sorted(p.name for p in shipped.iterdir()) == ["__init__.py", "vlforge"]
    assert (shipped / "vlforge/models/configs/clip-tiny.json").is_file()
    assert f"from {shipped.name}.vlforge.models" in (shipped / "vlforge/models/pyfunc.py").read_text()

    # the console script pip wrote, run as the installed program
    script = str(installed / "bin" / "vlforge")
    helped = _isolated(installed, app, RUN_SCRIPT, script, "--help", env=env)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "ingest" in helped.stdout and "export" in helped.stdout
    listed = _isolated(installed, app, RUN_SCRIPT, script, "datasets", "synth", env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert f"synth@{out['version']}" in listed.stdout and '"kept": 6' in listed.stdout
