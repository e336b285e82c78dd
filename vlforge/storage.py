"""Storage helpers over fsspec: one API for local folders and ``s3://`` prefixes.

Writes that readers may race with go through :func:`write_bytes_atomic`: a local file is written beside its
target and renamed into place; an S3 object appears whole on PUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec


def _storage_options(uri: str) -> dict[str, Any]:
    """fsspec storage options for ``uri`` (the S3 endpoint from the environment, if any)."""
    if uri.startswith("s3://"):
        endpoint = (
            os.environ.get("VLFORGE_S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a local path or remote URI."""
    fs, path = fsspec.core.url_to_fs(uri, **_storage_options(uri))
    return fs, path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        if part:
            out = f"{out}/{str(part).strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def list_names(uri: str) -> list[str]:
    """Names (not paths) of the direct children of ``uri``; empty when it does not exist."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(n for n in names if n)


def glob(uri_pattern: str) -> list[str]:
    """Matching URIs, sorted, with the scheme kept for remote storage."""
    fs, pattern = filesystem(uri_pattern)
    matches = sorted(fs.glob(pattern))
    if is_remote(uri_pattern):
        scheme = uri_pattern.split("://", 1)[0]
        return [f"{scheme}://{m}" for m in matches]
    return matches


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees either the old content or the new, never a part."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(uri: str) -> Iterator[str]:
    """A local path to write ``uri``'s content into (a large file is streamed, never held in memory); on a clean
    exit it becomes ``uri`` at once (a rename beside the target, or one upload to S3), on an error it is
    deleted and ``uri`` is left as it was."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fd, tmp = tempfile.mkstemp(prefix="vlforge-upload-")
        os.close(fd)
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        yield tmp
        if is_remote(uri):
            fs.put_file(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def remove(uri: str) -> None:
    """Remove a file or a folder tree; a missing one is fine."""
    fs, path = filesystem(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def unreachable(exc: BaseException) -> str | None:
    """What is wrong, in words, when ``exc`` is an object store that cannot be reached or refuses our
    credentials (the usual first-run mistakes); None for any other error."""
    name = type(exc).__name__
    endpoint = _storage_options("s3://x").get("client_kwargs", {}).get("endpoint_url") or "AWS S3"
    if name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
    ):
        return f"the object store at {endpoint} does not answer ({exc}); check VLFORGE_S3_ENDPOINT_URL"
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return f"no credentials for the object store at {endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if name == "ClientError" or (isinstance(exc, PermissionError) and "s3" in str(exc).lower()):
        return f"the object store at {endpoint} refused the request ({exc}); check the bucket and the credentials"
    return None


def remove_empty_folders(uri: str, levels: int) -> None:
    """Remove the folder ``uri`` and up to ``levels - 1`` of its parents while they are empty (what a failed
    first write leaves behind); object stores have no empty folders."""
    if is_remote(uri):
        return
    path = uri.removeprefix("file://")
    for _ in range(levels):
        try:
            os.rmdir(path)
        except OSError:  # not empty, or gone
            return
        path = os.path.dirname(path.rstrip("/"))


def put_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder tree to ``uri`` (local or remote)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        import shutil

        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    fs.put(local_dir.rstrip("/") + "/", path, recursive=True)


def get_dir(uri: str, local_dir: str) -> None:
    """Copy ``uri``'s folder tree to a local folder."""
    fs, path = filesystem(uri)
    os.makedirs(local_dir, exist_ok=True)
    if not is_remote(uri):
        import shutil

        shutil.copytree(path, local_dir, dirs_exist_ok=True)
        return
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
