"""Checks a URL before anything downloads it: scheme, shape, and (guard on) whether its host is or resolves to a
private, loopback, link-local or otherwise non-public address.

The guard resolves each distinct host once (cached, in threads) so a list of millions of rows costs one lookup per
host. It is a pre-check: redirects followed by the downloader and DNS answers that change between the check and
the download are not re-checked here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")

# Reasons (short, stable strings used in summaries and in the raw batch's error_message).
BAD_SCHEME = "bad_scheme"
MALFORMED_URL = "malformed_url"
PRIVATE_NETWORK = "private_network"


@dataclass(frozen=True)
class Refusal:
    reason: str  # BAD_SCHEME, MALFORMED_URL or PRIVATE_NETWORK
    detail: str  # human-readable, names the offending part


def parse_host(url: object) -> tuple[str | None, Refusal | None]:
    """Return ``(host, None)`` for a well-formed http(s) URL, else ``(None, Refusal)``."""
    if not isinstance(url, str) or not url.strip():
        return None, Refusal(MALFORMED_URL, "empty url")
    text = url.strip()
    if any(c.isspace() or ord(c) < 32 for c in text):
        return None, Refusal(MALFORMED_URL, "url contains whitespace or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        return None, Refusal(MALFORMED_URL, f"cannot parse url ({exc})")
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = scheme or "none"
        return None, Refusal(BAD_SCHEME, f"unsupported scheme {shown!r} (only http and https)")
    host = (parts.hostname or "").strip(".")
    if not host:
        return None, Refusal(MALFORMED_URL, "url has no host")
    del port
    return host.lower(), None


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return []  # unresolvable: the download fails and reports it; nothing private is reached
    return sorted({info[4][0] for info in infos})


def host_refusal(host: str) -> Refusal | None:
    """A refusal when ``host`` is, or resolves to, a non-public address."""
    try:
        addresses = [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        addresses = _resolve(host)
    for address in addresses:
        if not is_public_address(address):
            return Refusal(
                PRIVATE_NETWORK,
                f"host {host!r} resolves to non-public address {address} (use --allow-private-networks)",
            )
    return None


def refuse_hosts(hosts: Iterable[str], max_workers: int = 32) -> dict[str, Refusal]:
    """Check each distinct host once (DNS lookups in threads); returns the refused ones."""
    unique = sorted(set(hosts))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=min(max_workers, len(unique))) as pool:
        verdicts = pool.map(host_refusal, unique)
        return {h: v for h, v in zip(unique, verdicts, strict=True) if v is not None}
