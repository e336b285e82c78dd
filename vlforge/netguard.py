"""The network guard: what a download may fetch, checked before the download and on every connection it opens.

Three layers, one rule (an address is allowed when it is public, or lies in a network the user allowed, or the
user allowed every private network):

- **Before download** (staging): each URL's scheme and shape, and whether its host is or resolves to a private,
  loopback, link-local, multicast or reserved address. Each distinct host is resolved once (cached, in threads),
  so a list of millions of rows costs one lookup per host; refused rows never reach the downloader.
- **Every redirect** followed by ``urllib`` (img2dataset's HTTP client): the target's scheme and host are checked
  the same way, so ``302 Location: http://169.254.169.254/`` is refused with the hop named.
- **Every connection** urllib opens: the host is resolved once, every address it resolves to is checked, and the
  socket connects to those checked addresses (never to a second, possibly different, DNS answer).

The last two are active only inside :func:`guarded` (img2dataset's download workers enter it for each shard, in
whichever process runs the shard: a multiprocessing worker or a Ray worker); they patch ``urllib.request``'s HTTP
handlers once per process, leave every other client (botocore, requests, aiohttp) alone, and do nothing while
no guard is active. A refusal raises an ``OSError`` whose message starts with ``refused by vlforge: <reason>:``,
which img2dataset stores in the row's ``error_message``.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from vlforge.errors import VlforgeError

ALLOWED_SCHEMES = ("http", "https")

# Reasons (short, stable strings used in summaries and in the raw batch's error_message).
BAD_SCHEME = "bad_scheme"
MALFORMED_URL = "malformed_url"
PRIVATE_NETWORK = "private_network"
REFUSED_PREFIX = "refused by vlforge: "  # error_message = REFUSED_PREFIX + "<reason>: <detail>"
HINT = "allow it with --allow-network CIDR or --allow-private-networks"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refusal:
    reason: str  # BAD_SCHEME, MALFORMED_URL or PRIVATE_NETWORK
    detail: str  # human-readable, names the offending part

    @property
    def message(self) -> str:
        return f"{REFUSED_PREFIX}{self.reason}: {self.detail}"


class NetworkRefused(OSError):
    """A connection or redirect the guard refused (urllib wraps it in a URLError, img2dataset keeps its text)."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.message)
        self.refusal = refusal


def _ip(address: str) -> Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public_address(address: str) -> bool:
    ip = _ip(address)
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``127.0.0.1/32``, ``fd00::/8`` or a bare address (one host); one clear error otherwise."""
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise VlforgeError(
            f"--allow-network {text!r} is not a network: give a CIDR such as 10.0.0.0/8 or 127.0.0.1/32"
        ) from None


@dataclass(frozen=True)
class NetworkPolicy:
    """Which non-public addresses downloads may reach: none (the default), the listed networks, or all.

    An address in ``allowed_networks`` is treated as public; every other non-public address stays refused, so
    allowing ``127.0.0.1/32`` still refuses a redirect to ``127.0.0.2``.
    """

    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    _networks: tuple[Network, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_networks", tuple(str(n).strip() for n in self.allowed_networks))
        object.__setattr__(self, "_networks", tuple(parse_network(n) for n in self.allowed_networks))

    @classmethod
    def of(cls, allow_private: bool = False, allowed_networks: Sequence[str] | None = None) -> NetworkPolicy:
        return cls(bool(allow_private), tuple(allowed_networks or ()))

    @property
    def active(self) -> bool:
        """False when every address is allowed (``--allow-private-networks``): nothing needs checking."""
        return not self.allow_private

    def permits(self, address: str) -> bool:
        if self.allow_private or is_public_address(address):
            return True
        ip = _ip(address)
        return any(ip.version == net.version and ip in net for net in self._networks)


DEFAULT_POLICY = NetworkPolicy()


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


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return []  # unresolvable: the download fails and reports it; nothing private is reached
    return sorted({info[4][0] for info in infos})


def _addresses(host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        return _resolve(host)


def host_refusal(host: str, policy: NetworkPolicy = DEFAULT_POLICY) -> Refusal | None:
    """A refusal when ``host`` is, or resolves to, an address ``policy`` does not permit."""
    if not policy.active:
        return None
    for address in _addresses(host):
        if not policy.permits(address):
            return Refusal(
                PRIVATE_NETWORK, f"host {host!r} resolves to non-public address {address} ({HINT})"
            )
    return None


def refuse_hosts(
    hosts: Iterable[str], policy: NetworkPolicy = DEFAULT_POLICY, max_workers: int = 32
) -> dict[str, Refusal]:
    """Check each distinct host once (DNS lookups in threads); returns the refused ones."""
    unique = sorted(set(hosts))
    if not unique or not policy.active:
        return {}
    with ThreadPoolExecutor(max_workers=min(max_workers, len(unique))) as pool:
        verdicts = pool.map(lambda h: host_refusal(h, policy), unique)
        return {h: v for h, v in zip(unique, verdicts, strict=True) if v is not None}


# --- the guard on every hop (inside download workers) ---------------------------------------------------------

_active: NetworkPolicy | None = None  # the policy of the guard in force in this process, if any
_install_lock = threading.Lock()
_installed = False


def _guarded_create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """``socket.create_connection`` that resolves once, checks every answer, and connects only to those."""
    policy = _active
    if policy is None or not policy.active:
        return socket.create_connection(address, timeout, source_address)
    host, port = address
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for a in addresses:
        if not policy.permits(a):
            shown = f"[{host}]" if ":" in host else host
            raise NetworkRefused(
                Refusal(
                    PRIVATE_NETWORK, f"connection to {shown}:{port} refused: non-public address {a} ({HINT})"
                )
            )
    error: OSError | None = None
    for a in addresses:
        try:
            return socket.create_connection((a, port), timeout, source_address)
        except OSError as exc:
            error = exc
    raise error or OSError(f"getaddrinfo returned no address for {host}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_create_connection


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_create_connection  # TLS wraps this socket; SNI keeps the host name


_GUARDED_CLASSES = {
    http.client.HTTPConnection: _GuardedHTTPConnection,
    http.client.HTTPSConnection: _GuardedHTTPSConnection,
}


def redirect_refusal(url: str, policy: NetworkPolicy) -> Refusal | None:
    """Why a redirect to ``url`` must not be followed (a non-http(s) scheme or a non-permitted host), or None."""
    host, refusal = parse_host(url)
    if refusal is None:
        refusal = host_refusal(host, policy)
    if refusal is None:
        return None
    return Refusal(refusal.reason, f"redirect to {url[:300]} refused: {refusal.detail}")


def _install() -> None:
    """Patch urllib.request's HTTP handlers (once per process) to consult the active guard."""
    global _installed
    with _install_lock:
        if _installed:
            return
        handler = urllib.request.AbstractHTTPHandler
        redirect = urllib.request.HTTPRedirectHandler
        original_open, original_redirect = handler.do_open, redirect.redirect_request

        def do_open(self, http_class, req, **http_conn_args):
            if _active is not None:
                http_class = _GUARDED_CLASSES.get(http_class, http_class)
            return original_open(self, http_class, req, **http_conn_args)

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            policy = _active
            refusal = redirect_refusal(newurl, policy) if policy is not None else None
            if refusal is not None:
                fp.close()
                raise urllib.error.URLError(NetworkRefused(refusal))
            return original_redirect(self, req, fp, code, msg, headers, newurl)

        handler.do_open = do_open
        redirect.redirect_request = redirect_request
        _installed = True


@contextlib.contextmanager
def guarded(policy: NetworkPolicy) -> Iterator[None]:
    """Check every redirect and connection urllib makes in this process (all threads) against ``policy``."""
    global _active
    if not policy.active:
        yield
        return
    _install()
    previous, _active = _active, policy
    try:
        yield
    finally:
        _active = previous
