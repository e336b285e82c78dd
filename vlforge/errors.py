"""Errors a user can cause. Each carries one clear message naming the thing and the fix."""


class VlforgeError(Exception):
    """Base class: the CLI prints the message alone (no traceback) and exits with status 2."""


class UrlListError(VlforgeError):
    """A URL list that cannot be read, has no rows, or lacks a required column."""


class DatasetNotFoundError(VlforgeError):
    """A dataset name or version that does not exist (or has no published manifest)."""


class ModelNotFoundError(VlforgeError):
    """A model URI, directory or Hugging Face id that cannot be found or loaded."""


class SourceNotFoundError(VlforgeError):
    """A source with no ingested raw batches."""


class ServerUnreachableError(VlforgeError):
    """A tracking server, Prefect API, Ray cluster or object store that does not answer."""


def printable(text: str, limit: int = 2000) -> str:
    """``text`` safe to print on a terminal: control characters (a binary file's bytes quoted in a parser's
    message) shown as escapes, and at most ``limit`` characters."""
    out = "".join(
        c if c in "\n\t" or (c >= " " and not "\x7f" <= c <= "\x9f") else c.encode("unicode_escape").decode()
        for c in text[:limit]
    )
    return out + (f"... ({len(text) - limit} more characters)" if len(text) > limit else "")
