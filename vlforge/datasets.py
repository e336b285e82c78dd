"""Dataset versions: ``datasets/<name>/<version>/{data,rejected,embeddings}/`` + ``manifest.json``.

A version exists for readers only once its ``manifest.json`` is written, and that is written last. ``LATEST``
names the newest complete version; ``name`` resolves to it, ``name@version`` pins one. Version ids sort by
time, so the newest complete version can always be recomputed from a listing (``LATEST`` is a fast path and
is repaired when two publishers race).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlforge import storage
from vlforge.errors import DatasetNotFoundError
from vlforge.hfformat import with_encoded_images
from vlforge.naming import InvalidNameError, check_name, is_valid_name
from vlforge.settings import Settings

MANIFEST = "manifest.json"
LATEST = "LATEST"
# What new_version_id makes; no other folder under datasets/<name>/ is a version (nor listed, nor collected).
_VERSION_RE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{4}$")


@dataclass(frozen=True)
class DatasetRef:
    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> DatasetRef:
        name, at, version = text.partition("@")
        try:
            check_name("dataset", name, example="'demo' or 'demo@<version>'")
            if at:
                check_name("dataset version", version, example="'demo@20261121T101500123456Z-3f9a'")
        except InvalidNameError as exc:
            raise DatasetNotFoundError(str(exc)) from None
        return cls(name=name, version=version or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: str
    uri: str
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def part_files(self, part: str = "data") -> list[str]:
        return storage.glob(storage.join(self.uri, part, "*.parquet"))

    def read_table(
        self, part: str = "data", columns: list[str] | None = None, stored_layout: bool = False
    ) -> pa.Table:
        """The part's rows; ``image`` as plain encoded bytes whichever layout the version was published in
        (``stored_layout=True``: as stored, the ``datasets.Image`` struct in newer versions)."""
        files = self.part_files(part)
        if not files:
            return pa.table({}) if columns is None else pa.table({c: [] for c in columns})
        tables = []
        for f in files:
            fs, path = storage.filesystem(f)
            with fs.open(path, "rb") as fh:
                t = pq.read_table(fh, columns=columns)
            tables.append(t if stored_layout else with_encoded_images(t))
        return pa.concat_tables(tables, promote_options="default")


def datasets_root(settings: Settings) -> str:
    return storage.join(settings.storage_uri, "datasets")


def new_version_id(now: dt.datetime | None = None) -> str:
    """A time-sortable, collision-free version id such as ``20261121T101500123456Z-3f9a``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(2)


def is_version_id(name: str) -> bool:
    return bool(_VERSION_RE.match(name))


def list_versions(settings: Settings, name: str) -> list[str]:
    """Complete versions (with a manifest) of ``name``, oldest first."""
    root = storage.join(datasets_root(settings), DatasetRef.parse(name).name)
    versions = [v for v in storage.list_names(root) if is_version_id(v)]
    return [v for v in sorted(versions) if storage.exists(storage.join(root, v, MANIFEST))]


def dataset_names(settings: Settings) -> list[str]:
    """Every folder under ``datasets/`` that is a dataset's by the naming rule (published or not)."""
    return [n for n in storage.list_names(datasets_root(settings)) if is_valid_name(n)]


def list_datasets(settings: Settings) -> list[str]:
    return [n for n in dataset_names(settings) if list_versions(settings, n)]


def _latest_version(settings: Settings, name: str) -> str | None:
    root = storage.join(datasets_root(settings), name)
    hinted = None
    latest_uri = storage.join(root, LATEST)
    if storage.exists(latest_uri):
        hinted = storage.read_text(latest_uri).strip() or None
    complete = list_versions(settings, name)
    newest = complete[-1] if complete else None
    if (
        hinted
        and is_version_id(hinted)
        and storage.exists(storage.join(root, hinted, MANIFEST))
        and (newest is None or hinted >= newest)
    ):
        return hinted
    return newest


def resolve_dataset(settings: Settings, ref: str | DatasetRef) -> DatasetVersion:
    """Resolve ``name`` (newest complete version) or ``name@version`` to a published version."""
    ref = DatasetRef.parse(ref) if isinstance(ref, str) else ref
    root = storage.join(datasets_root(settings), ref.name)
    version = ref.version or _latest_version(settings, ref.name)
    if version is None:
        known = ", ".join(list_datasets(settings)) or "none"
        raise DatasetNotFoundError(
            f"unknown dataset {ref.name!r} under {datasets_root(settings)} (known datasets: {known}); "
            f"publish one with `vlforge curate --source SOURCE --dataset {ref.name}`"
        )
    uri = storage.join(root, version)
    manifest_uri = storage.join(uri, MANIFEST)
    if not is_version_id(version) or not storage.exists(manifest_uri):
        known = ", ".join(list_versions(settings, ref.name)) or "none"
        raise DatasetNotFoundError(
            f"dataset {ref.name!r} has no complete version {version!r} (complete versions: {known})"
        )
    return DatasetVersion(ref.name, version, uri, storage.read_json(manifest_uri))


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class VersionWriter:
    """Writes one new version; nothing is visible to readers until :meth:`publish`.

    Each writer owns a unique version folder, so two curations of the same dataset at once never mix parts. The
    folder carries a ``_staging.json`` (who writes it, for which inputs) until the manifest is written: a
    version folder without a manifest whose writer is gone is *abandoned*. :func:`open_version` resumes an
    abandoned folder of the same inputs (parts already written are kept) and :func:`remove_abandoned`
    (``vlforge gc``) deletes the others.
    """

    def __init__(self, settings: Settings, name: str, version: str | None = None, fingerprint: str = ""):
        DatasetRef.parse(name)
        self.settings = settings
        self.name = name
        self.version = version or new_version_id()
        self.uri = storage.join(datasets_root(settings), name, self.version)
        self.fingerprint = fingerprint
        self._parts: dict[str, dict[str, str]] = {}  # part -> relpath -> sha256 of its bytes
        self.published = False
        self._inputs_lock: str | None = (
            None  # open_version's lock on these inputs, released at publish/abandon
        )

    def abandon(self) -> None:
        """Remove the unpublished folder (nothing of it is worth keeping) and release the inputs lock."""
        storage.remove(self.uri)
        self._release()

    def _release(self) -> None:
        if self._inputs_lock is not None:
            handle = _HELD_LOCKS.pop(self._inputs_lock, None)
            if handle is not None:
                handle.close()  # closing the file releases its flock
            self._inputs_lock = None

    def claim(self) -> None:
        """Mark the folder as being written by this process (for resume and gc)."""
        storage.write_json_atomic(storage.join(self.uri, STAGING), staging_owner(self.fingerprint))

    def add_part(self, part: str, relpath: str, digest: str) -> None:
        """Record a file written under the version (by this process or a Ray task) for the content hash."""
        self._parts.setdefault(part, {})[relpath] = digest

    def write_table(self, part: str, table: pa.Table, index: int | None = None) -> str:
        """Write ``table`` as ``<part>/part-NNNNN.parquet`` and return its URI."""
        files = self._parts.setdefault(part, {})
        n = len(files) if index is None else index
        relpath = f"{part}/part-{n:05d}.parquet"
        data = _table_bytes(table)
        uri = storage.join(self.uri, relpath)
        storage.write_bytes_atomic(uri, data)
        self.add_part(part, relpath, hashlib.sha256(data).hexdigest())
        return uri

    def write_bytes(self, relpath: str, data: bytes) -> str:
        uri = storage.join(self.uri, relpath)
        storage.write_bytes_atomic(uri, data)
        self.add_part(relpath.split("/", 1)[0], relpath, hashlib.sha256(data).hexdigest())
        return uri

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for relpath, digest in sorted(p for files in self._parts.values() for p in files.items()):
            h.update(relpath.encode() + bytes.fromhex(digest))
        return h.hexdigest()

    def publish(
        self, manifest: dict[str, Any], describe: Callable[[DatasetVersion], dict[str, str]] | None = None
    ) -> DatasetVersion:
        """Write ``manifest.json`` (last) and move ``LATEST`` forward if this version is the newest.

        ``describe``: given the version as it will be published, the text files that describe it (the dataset
        card ``README.md``); written before the manifest and not part of the content hash, which covers the
        data alone."""
        full = {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "parts": {k: sum(1 for r in v if r.endswith(".parquet")) for k, v in self._parts.items()},
            "content_hash": self.content_hash(),
            **manifest,
        }
        if describe is not None:
            files = describe(DatasetVersion(self.name, self.version, self.uri, full))
            full["described_by"] = sorted(files)
            for relpath, text in files.items():
                storage.write_text_atomic(storage.join(self.uri, relpath), text)
        storage.write_json_atomic(storage.join(self.uri, MANIFEST), full)
        storage.remove(storage.join(self.uri, STAGING))
        self.published = True
        self._advance_latest()
        self._release()
        return DatasetVersion(self.name, self.version, self.uri, full)

    def _advance_latest(self) -> None:
        latest_uri = storage.join(datasets_root(self.settings), self.name, LATEST)
        # Compare-and-repair: after writing, the newest complete version must be what LATEST names.
        for _ in range(5):
            newest = list_versions(self.settings, self.name)[-1]
            current = storage.read_text(latest_uri).strip() if storage.exists(latest_uri) else ""
            if current >= newest:
                return
            storage.write_text_atomic(latest_uri, newest)


# -- abandoned versions: resume or remove -------------------------------------------------------------------

STAGING = "_staging.json"
# A writer on another host is presumed gone after this long without publishing (same host: its pid is checked).
STALE_AFTER = dt.timedelta(hours=24)


UNCLAIMED_GRACE = dt.timedelta(minutes=10)


def _version_time(version: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(version.split("-", 1)[0], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.UTC)


def staging_owner(fingerprint: str) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
    }


def _owner_alive(owner: dict[str, Any], now: dt.datetime) -> bool:
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid") or 0)
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = dt.datetime.fromisoformat(owner.get("started_at") or "1970-01-01T00:00:00+00:00")
    return now - started < STALE_AFTER


@dataclass(frozen=True)
class Abandoned:
    name: str
    version: str
    uri: str
    fingerprint: str | None


def abandoned_versions(settings: Settings, name: str) -> list[Abandoned]:
    """Version folders of ``name`` without a manifest whose writer is gone, oldest first."""
    root = storage.join(datasets_root(settings), name)
    now = dt.datetime.now(dt.UTC)
    out = []
    for v in storage.list_names(root):
        if not is_version_id(v) or storage.exists(storage.join(root, v, MANIFEST)):
            continue
        uri = storage.join(root, v)
        marker = storage.join(uri, STAGING)
        owner = storage.read_json(marker) if storage.exists(marker) else {}
        if owner and _owner_alive(owner, now):
            continue
        if not owner and now - _version_time(v) < UNCLAIMED_GRACE:
            continue  # a writer between creating its folder and claiming it, or a legacy one just started
        out.append(Abandoned(name, v, uri, owner.get("fingerprint")))
    return out


def remove_abandoned(settings: Settings, name: str | None = None, keep: str | None = None) -> list[Abandoned]:
    """Delete abandoned version folders (of ``name``, or of every dataset) except version ``keep``: only
    folders named like a version id, without a manifest, directly under ``datasets/<name>/``; never a
    published version, never anything else."""
    names = [DatasetRef.parse(name).name] if name else dataset_names(settings)
    removed = []
    for n in names:
        for a in abandoned_versions(settings, n):
            if a.version != keep:
                storage.remove(a.uri)
                removed.append(a)
    return removed


def collect_garbage(settings: Settings, name: str | None = None) -> list[Abandoned]:
    """``vlforge gc [NAME]``: :func:`remove_abandoned` for an existing dataset named by the naming rule (a
    version, a path or an unknown name is refused before anything is looked at), or for every dataset."""
    if name is not None:
        ref = DatasetRef.parse(name)
        if ref.version is not None:
            raise DatasetNotFoundError(
                f"gc takes a dataset name, not a version ({name!r}): it removes the abandoned versions of "
                f"{ref.name!r} and never a published one"
            )
        if ref.name not in dataset_names(settings):
            known = ", ".join(dataset_names(settings)) or "none"
            raise DatasetNotFoundError(f"unknown dataset {name!r} (datasets: {known})")
    return remove_abandoned(settings, name)


def live_writers(settings: Settings, name: str, fingerprint: str) -> list[str]:
    """Versions of ``name`` being written now, by a live process, from the inputs ``fingerprint``."""
    root = storage.join(datasets_root(settings), name)
    now = dt.datetime.now(dt.UTC)
    out = []
    for v in storage.list_names(root):
        marker = storage.join(root, v, STAGING)
        if not is_version_id(v) or not storage.exists(marker):
            continue
        try:
            owner = storage.read_json(marker)
        except (FileNotFoundError, ValueError):  # published (or replaced) while we looked
            continue
        mine = owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
        if owner.get("fingerprint") == fingerprint and not mine and _owner_alive(owner, now):
            out.append(v)
    return out


def wait_for_writers(settings: Settings, name: str, fingerprint: str, poll_s: float = 2.0) -> None:
    """Wait while another live process writes a version of ``name`` from the same inputs (two curates of the
    same inputs at once): the caller then finds that version published instead of writing its twin."""
    import time

    from vlforge import console

    first = True
    while writers := live_writers(settings, name, fingerprint):
        if first:
            console.info(
                f"another process is writing {name}@{writers[0]} from the same inputs; waiting for it"
            )
            first = False
        time.sleep(poll_s)


# Inputs locks this process holds (lock path -> its open file): a writer that failed before publishing keeps its
# lock, and a retry in the same process (a Prefect task retry) takes it over instead of waiting on itself.
_HELD_LOCKS: dict[str, Any] = {}


def _lock_inputs(settings: Settings, name: str, fingerprint: str) -> str | None:
    """An exclusive lock on making a version of ``name`` from the inputs ``fingerprint`` (an flock on a file,
    released when it is closed or its process dies); waits while another process holds it. Returns the lock's
    key in :data:`_HELD_LOCKS`. Local storage only: an object store has no locks, and there
    :func:`wait_for_writers` and the caller's check before publishing narrow the race instead (None)."""
    if settings.storage_is_remote or not fingerprint:
        return None
    import fcntl
    import tempfile

    from vlforge import console

    # Beside the storage, not in it (a lock file outlives its holder: removing it would race with a waiter).
    root = hashlib.sha256(os.path.realpath(settings.storage_uri).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "vlforge-locks", root)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"version-{name}-{fingerprint[:16]}.lock")
    if path in _HELD_LOCKS:  # this process holds it already (an earlier, unfinished writer): take it over
        return path
    handle = open(path, "a")  # noqa: SIM115 - closed by VersionWriter._release (or the process's end)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        console.info(f"another process is making a version of {name} from the same inputs; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
    _HELD_LOCKS[path] = handle
    return path


def open_version(settings: Settings, name: str, fingerprint: str) -> tuple[VersionWriter, bool]:
    """A writer for a new version of ``name``: the abandoned folder of the same inputs when there is one
    (``resumed`` True: its finished parts are reused), else a fresh one. Other abandoned folders are removed.

    The writer holds a lock on its inputs until it publishes or is abandoned: a second writer of the same inputs
    waits here, so the caller should check again whether the version it would make now exists."""
    lock = _lock_inputs(settings, name, fingerprint)
    same = [a for a in abandoned_versions(settings, name) if fingerprint and a.fingerprint == fingerprint]
    writer = VersionWriter(settings, name, same[-1].version if same else None, fingerprint)
    writer._inputs_lock = lock
    remove_abandoned(settings, name, keep=writer.version)
    writer.claim()
    return writer, bool(same)
