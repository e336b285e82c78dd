"""DESIGN's rules for the code itself: imports go one way, and nothing runs at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "vlforge": {"vlforge"},
    "models": {"vlforge", "models"},
    "tasks": {"vlforge", "models", "tasks"},
    "flows": {"vlforge", "models", "tasks", "flows"},
}


def _imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in ALLOWED}
    return found


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_imports_go_one_way(layer):
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_layers(p) - ALLOWED[layer])
        for p in (ROOT / layer).rglob("*.py")
        if _imported_layers(p) - ALLOWED[layer]
    }
    assert offenders == {}


def test_nothing_runs_at_import_time(tmp_path):
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for layer in ALLOWED
        for p in (ROOT / layer).rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "import ray, mlflow\n"
        "assert not ray.is_initialized(), 'ray was initialised at import'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    created = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert created == [], f"importing created {created}"
    assert not (tmp_path / ".vlforge").exists()
