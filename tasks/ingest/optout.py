"""Opt-out lists: files of domains and URL prefixes whose owners asked not to be crawled, applied at staging, before
any request (reason ``opted_out``).

One entry a line, ``#`` starts a comment. A line with a scheme (``https://example.com/gallery/``) is a URL prefix:
a URL is covered when it starts with it (scheme and host compared without case). Any other line is a domain
(``example.com``, optionally ``*.example.com`` or with a trailing path-less ``/``): it covers the domain and all
its subdomains (``img.example.com``), never a look-alike (``notexample.com``). Each file's sha256 goes into the
batch's MLflow params and the dataset card, so a run says which lists it honoured.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from vlforge import storage
from vlforge.errors import VlforgeError

OPTED_OUT = "opted_out"


@dataclass(frozen=True)
class OptOutList:
    domains: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()  # normalised: lower-case scheme://host, path as given
    digests: dict[str, str] = field(default_factory=dict)  # file -> sha256 of its bytes

    def __bool__(self) -> bool:
        return bool(self.domains or self.prefixes)

    def refusal(self, url: str, host: str) -> str | None:
        """``opted_out: <why>`` when ``url`` (whose host is ``host``, lower case) is covered, else None."""
        labels = host.split(".")
        for i in range(len(labels)):
            domain = ".".join(labels[i:])
            if domain in self.domains:
                return f"{OPTED_OUT}: domain {domain} is on an opt-out list"
        if self.prefixes:
            normal = _normal_url(url)
            site = normal.split("/", 3)[:3]  # only the prefixes of this scheme://authority can match
            for prefix in self.by_site.get("/".join(site), ()):
                if normal.startswith(prefix):
                    return f"{OPTED_OUT}: url prefix {prefix} is on an opt-out list"
        return None

    @functools.cached_property
    def by_site(self) -> dict[str, tuple[str, ...]]:
        """The prefixes grouped by their ``scheme://authority``: a row is compared with its own site's only."""
        groups: dict[str, list[str]] = {}
        for prefix in self.prefixes:
            groups.setdefault("/".join(prefix.split("/", 3)[:3]), []).append(prefix)
        return {site: tuple(p) for site, p in groups.items()}


def _normal_url(url: str) -> str:
    parts = urlsplit(url.strip())
    rest = url.strip()[len(parts.scheme) + 3 + len(parts.netloc) :]
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{rest}"


def _entry(line: str, where: str) -> tuple[str, str]:
    """``("prefix", normalised)`` or ``("domain", name)`` for one non-empty line."""
    if "://" in line:
        parts = urlsplit(line)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise VlforgeError(f"{where}: {line!r} is not an http(s) URL prefix or a domain")
        return "prefix", _normal_url(line)
    domain = line.lower().removeprefix("*.").rstrip("/").strip(".")
    if not domain or "/" in domain or any(c.isspace() for c in domain):
        raise VlforgeError(
            f"{where}: {line!r} is neither a domain (example.com) nor a URL prefix (https://example.com/path/)"
        )
    return "domain", domain


def load_opt_out_lists(paths: list[str] | tuple[str, ...] | None) -> OptOutList:
    """Read the opt-out list files (local or s3://); one clear error names a missing file or a bad line."""
    domains: set[str] = set()
    prefixes: list[str] = []
    digests: dict[str, str] = {}
    for path in paths or ():
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise VlforgeError(f"--opt-out-list {path}: no such file") from None
        digests[path] = hashlib.sha256(data).hexdigest()
        for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, value = _entry(line, f"--opt-out-list {path} line {number}")
            if kind == "domain":
                domains.add(value)
            else:
                prefixes.append(value)
    return OptOutList(frozenset(domains), tuple(dict.fromkeys(prefixes)), digests)
