"""Prefect artifacts, for every flow and stage: a markdown summary, tables of counts and metrics, links to MLflow.

One helper (:func:`publish`) for all of them; outside a Prefect flow or task run it only returns the markdown."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_(none)_"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from free text such as a dataset name."""
    return "-".join("".join(c if c.isalnum() else "-" for c in p.lower()).strip("-") for p in parts)


def publish(
    key: str,
    title: str,
    lines: list[str],
    tables: dict[str, list[dict[str, Any]]] | None = None,
    links: dict[str, str] | None = None,
) -> str:
    """Create the artifacts (inside a flow run) and return the markdown, which callers may also print."""
    tables = tables or {}
    links = links or {}
    md = [f"# {title}", "", *lines, ""]
    for name, rows in tables.items():
        md += [f"## {name}", "", markdown_table(rows), ""]
    if links:
        md += ["## Links", ""] + [f"- [{text}]({url})" for text, url in links.items()]
    text = "\n".join(md)
    if not _in_prefect_run():
        return text
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    try:
        create_markdown_artifact(text, key=f"{key}-summary", description=title)
        for name, rows in tables.items():
            if rows:
                slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
                create_table_artifact(rows, key=f"{key}-{slug}", description=f"{title}: {name}")
        for text_, url in links.items():
            create_link_artifact(url, link_text=text_, description=title)
    except Exception as exc:  # artifacts are a report: never fail the work because of them
        log.warning("could not create Prefect artifacts: %s", exc)
    return text
