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
