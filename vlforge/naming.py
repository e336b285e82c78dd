"""One naming rule for every name that becomes a path or a key: sources, datasets, dataset versions, export
prefixes and MLflow run names. Every command and every Prefect form checks names through :func:`check_name`,
so the same name is accepted or refused everywhere with the same message.

The rule: 1 to 128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a letter or a digit.
That excludes path separators (``/``, ``\\``), ``.`` and ``..`` and hidden (dot-) names, spaces, ``:`` and
``@`` (which separates a dataset's name from its version), and stays far below every file system's limit
on one path component (255 bytes).
"""

from __future__ import annotations

import re

from vlforge.errors import VlforgeError

MAX_NAME_CHARS = 128
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}$"
_NAME_RE = re.compile(NAME_PATTERN)
RULE = f"1-{MAX_NAME_CHARS} letters, digits, '.', '_' or '-', starting with a letter or digit"

# MLflow registry aliases (``champion``): MLflow allows word characters and '-'; 'latest' and 'v<N>' are taken.
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class InvalidNameError(VlforgeError):
    """A name that breaks the naming rule."""


def shown(value: str, limit: int = 60) -> str:
    """``value`` as it can be printed in one line: control characters escaped, long values cut."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(value)} characters)"


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME_RE.match(value))


def check_name(kind: str, value: str, example: str = "") -> str:
    """Return ``value`` if it is a valid name of ``kind`` ("dataset", "source", "export prefix"...), else raise
    :class:`InvalidNameError` with the rule."""
    if is_valid_name(value):
        return value
    hint = f" (e.g. {example})" if example else ""
    raise InvalidNameError(f"invalid {kind} name {shown(str(value))}: use {RULE}{hint}")


def check_alias(alias: str) -> str:
    """A registry alias the MLflow registry accepts (and that is not the reserved 'latest' or 'v<N>')."""
    if not _ALIAS_RE.match(alias or "") or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise InvalidNameError(
            f"invalid alias {shown(alias)}: use letters, digits, '_' or '-' (e.g. champion); "
            "'latest' and 'v<N>' are reserved by MLflow"
        )
    return alias
