"""Move Python modules under another package name: the one import rewriter vlforge uses.

Two places ship our modules under a name other than the folder they live in, and both use
:func:`rewrite_imports`:

- the wheel (``vlforge_build.py`` at the repository root): ``models``, ``tasks`` and ``flows`` are folders at
  the top of the repository, but an installed vlforge must not claim those import names (an app has its own
  ``models.py``), so the wheel holds them as ``vlforge.models``, ``vlforge.tasks`` and ``vlforge.flows``;
- a registered model's code (``models/pyfunc_code.py``): the wrapper's modules ship as
  ``vlforge_pyfunc_<hash>.models...`` and ``vlforge_pyfunc_<hash>.vlforge...``.

The rewrite is by the parser, not by text search, so docstrings and comments keep naming the modules as the
repository does. Standard library only: the build hook imports this module before anything is installed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping

Edit = tuple[int, int, int, int, str]  # line, column, end line, end column (UTF-8 bytes, as ast gives), text


def relocate_name(name: str, roots: Mapping[str, str]) -> str:
    """``models.pyfunc`` -> ``vlforge.models.pyfunc`` for ``roots={"models": "vlforge.models"}``; a name
    outside ``roots`` is returned as it is. ``name`` may carry an attribute (``flows.main:main``)."""
    module, colon, attr = name.partition(":")
    root, dot, rest = module.partition(".")
    if root not in roots:
        return name
    return roots[root] + dot + rest + colon + attr


def _import_edit(node: ast.Import, alias: ast.alias, roots: Mapping[str, str], where: str) -> Edit | None:
    """The edit that moves one name of an ``import`` statement, or None when the name is not ours."""
    root, _, rest = alias.name.partition(".")
    if root not in roots:
        return None
    new = relocate_name(alias.name, roots)
    span = (alias.lineno, alias.col_offset, alias.end_lineno, alias.end_col_offset)
    if alias.asname:
        return (*span, f"{new} as {alias.asname}")
    parent, _, last = new.rpartition(".")
    if not parent:
        return (*span, f"{new} as {alias.name}")
    # `import models.clip` binds `models`: no statement under another package binds the same name
    if rest or len(node.names) != 1:
        raise ValueError(
            f"{where}:{node.lineno}: 'import {alias.name}' cannot be moved under another package name; "
            f"write 'from {alias.name.rpartition('.')[0] or alias.name} import ...' on a line of its own"
        )
    statement = (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
    return (*statement, f"from {parent} import {last}")


def _string_nodes(tree: ast.AST) -> Iterable[ast.Constant]:
    """String constants outside f-strings (an f-string's parts carry the f-string's position)."""
    inside = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside:
            yield node


def rewrite_imports(
    source: str, roots: Mapping[str, str], modules: Iterable[str] = (), where: str = "<source>"
) -> str:
    """``source`` with its absolute imports of the packages in ``roots`` moved: for
    ``roots={"models": "vlforge.models"}``, ``from models.x import y`` -> ``from vlforge.models.x import y``,
    ``import models.x as m`` -> ``import vlforge.models.x as m``, ``import models`` ->
    ``from vlforge import models``, anywhere in the file (function bodies too). A string constant that is
    exactly one of ``modules`` (a module path passed to ``importlib``, e.g. ``"models.pyfunc"``) is moved as
    well. Relative imports, docstrings, comments and other strings stay as they were.

    ``import models.x`` (no ``as``) binds ``models`` and has no equivalent under another package: ValueError.
    """
    modules = set(modules)
    edits: list[Edit] = []
    tree = ast.parse(source, where)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            new = relocate_name(node.module, roots)
            if new != node.module:
                line = lines[node.lineno - 1].encode()
                head = re.compile(rb"from\s+" + re.escape(node.module.encode()) + rb"(?![\w.])")
                found = head.match(line, node.col_offset)
                if found is None:  # a line continuation inside the statement's head: rare enough to refuse
                    raise ValueError(
                        f"{where}:{node.lineno}: write 'from {node.module} import ...' on one line"
                    )
                edits.append((node.lineno, found.start(), node.lineno, found.end(), f"from {new}"))
        elif isinstance(node, ast.Import):
            edits.extend(e for a in node.names if (e := _import_edit(node, a, roots, where)) is not None)
    for node in _string_nodes(tree):
        if node.value in modules:
            new = relocate_name(node.value, roots)
            if new != node.value:
                edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, repr(new)))
    return _apply(lines, edits)


def _apply(lines: list[str], edits: list[Edit]) -> str:
    """Replace each span (1-based lines, UTF-8 byte columns as the parser gives them), last span first."""
    raw = [line.encode() for line in lines]
    for lineno, col, end_lineno, end_col, text in sorted(edits, reverse=True):
        first, last = raw[lineno - 1], raw[end_lineno - 1]
        raw[lineno - 1 : end_lineno] = [first[:col] + text.encode() + last[end_col:]]
    return b"".join(raw).decode()
