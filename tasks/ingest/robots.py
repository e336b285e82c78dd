"""What each site says about being crawled, read once per site per batch, at staging, before any image request:
``/robots.txt`` (parsed with protego: wildcards, ``$``, ``Crawl-delay``, matched against our user agent's product
token) and ``/.well-known/tdmrep.json`` (the W3C TDM Reservation Protocol's site-wide file).

The conventions for a robots.txt that cannot be read: a 4xx answer (no file) allows everything; a 5xx answer, a
timeout or a connection failure disallows the whole site for this batch (reason ``robots_unavailable``, a
transient failure ``--retry-failed`` fetches again; a host that does not answer at all gives its rows the network's
reason, ``connection_refused`` or ``dns_error``, equally transient). A URL that robots.txt disallows is never requested (reason
``robots_disallowed``); a URL a ``tdmrep.json`` rule reserves (``"tdm-reservation": 1``) is not requested either
(reason ``tdm_reserved``).

Sites are fetched in threads (``max_workers`` at once), each once: the driver reads them while staging, so N
download workers never fetch them N times. The fetch goes through urllib under the network guard, like the images.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tasks.ingest.accounting import reason
from vlforge import netguard

ROBOTS_DISALLOWED = "robots_disallowed"
ROBOTS_UNAVAILABLE = "robots_unavailable"
TDM_RESERVED = "tdm_reserved"
MAX_ROBOTS_BYTES = 500 * 1024  # what Google reads of a robots.txt; the rest is ignored
MAX_TDMREP_BYTES = 1024 * 1024
_UNREACHABLE = ("connection_refused", "dns_error", "private_network")


@dataclass
class SiteRules:
    robots: object | None = None  # a protego.Protego, None when there is no robots.txt (4xx)
    unavailable: str | None = None  # why robots.txt could not be read (5xx, timeout): the site is disallowed
    unavailable_reason: str = ROBOTS_UNAVAILABLE  # or the network reason: connection_refused, dns_error
    tdm: list[tuple[re.Pattern, bool]] = field(default_factory=list)  # tdmrep.json: (location, reserved)

    def crawl_delay(self, token: str) -> float | None:
        if self.robots is None:
            return None
        delay = self.robots.crawl_delay(token)
        return float(delay) if delay else None


def site_of(url: str) -> tuple[str, str, str]:
    """``(scheme://authority, authority, path?query)`` of a URL that passed netguard.parse_host."""
    parts = urlsplit(url.strip())
    authority = parts.netloc.rsplit("@", 1)[-1].lower()
    path = parts.path or "/"
    return (
        f"{parts.scheme.lower()}://{authority}",
        authority,
        path + (f"?{parts.query}" if parts.query else ""),
    )


def _pattern(location: str) -> re.Pattern:
    """A robots.txt-style path pattern (``*`` any run, ``$`` end): TDMRep's ``location`` syntax."""
    anchored = location.endswith("$")
    body = re.escape(location.rstrip("$")).replace(r"\*", ".*")
    if not body.startswith("/") and not body.startswith(".*"):
        body = "/" + body
    return re.compile(body + ("$" if anchored else ""))


def parse_tdmrep(data: bytes) -> list[tuple[re.Pattern, bool]]:
    """The rules of a tdmrep.json (a JSON array of ``{"location": ..., "tdm-reservation": 0|1}``); an invalid
    file holds no rules (the protocol then falls back to the headers)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return []
    rules = []
    for item in doc if isinstance(doc, list) else []:
        if isinstance(item, dict) and isinstance(item.get("location"), str):
            rules.append((_pattern(item["location"]), str(item.get("tdm-reservation", 0)).strip() == "1"))
    return rules


def tdm_reserved(rules: list[tuple[re.Pattern, bool]], path: str) -> bool:
    """The first rule whose location matches ``path`` decides."""
    for pattern, reserved in rules:
        if pattern.match(path):
            return reserved
    return False


def _get(url: str, user_agent: str, timeout: float, limit: int) -> tuple[int, bytes]:
    """``(status, body)``; raises OSError (timeouts, refused connections, the guard's refusals)."""
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(limit)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, b""


def fetch_site(site: str, user_agent: str, timeout: float, robots: bool = True) -> SiteRules:
    """robots.txt (unless ``robots`` is off) and tdmrep.json of ``site`` (``scheme://authority``)."""
    rules = SiteRules()
    if robots:
        _fetch_robots(rules, site, user_agent, timeout)
        if rules.unavailable:
            return rules  # the whole site is disallowed for this batch
    try:
        status, body = _get(f"{site}/.well-known/tdmrep.json", user_agent, timeout, MAX_TDMREP_BYTES)
    except Exception:
        return rules  # no site-wide file: the response headers still count
    if status < 300:
        rules.tdm = parse_tdmrep(body)
    return rules


def _fetch_robots(rules: SiteRules, site: str, user_agent: str, timeout: float) -> None:
    from protego import Protego

    try:
        status, body = _get(f"{site}/robots.txt", user_agent, timeout, MAX_ROBOTS_BYTES)
    except Exception as exc:  # timeout, connection refused, refused by the guard
        rules.unavailable = f"robots.txt of {site} could not be read ({str(exc)[:200]})"
        network = reason("failed_to_download", str(exc))
        if network in _UNREACHABLE:  # the host does not answer at all: say so rather than blame robots.txt
            rules.unavailable_reason = network
        return
    if status >= 500:
        rules.unavailable = f"robots.txt of {site} answered HTTP {status}"
    elif status < 300:
        rules.robots = Protego.parse(body.decode("utf-8", "replace"))


class SiteCheck:
    """Per-row refusals from each site's robots.txt and tdmrep.json, each site fetched once (in threads)."""

    def __init__(
        self,
        user_agent: str,
        token: str,
        timeout: float,
        network: netguard.NetworkPolicy,
        robots: bool = True,
        max_workers: int = 32,
    ) -> None:
        self.user_agent, self.token, self.timeout = user_agent, token, timeout
        self.network, self.robots, self.max_workers = network, robots, max_workers
        self.sites: dict[str, SiteRules] = {}

    def _fetch(self, sites: set[str]) -> None:
        new = sorted(s for s in sites if s not in self.sites)
        if not new:
            return
        with netguard.guarded(self.network), ThreadPoolExecutor(min(self.max_workers, len(new))) as pool:
            fetched = pool.map(lambda s: fetch_site(s, self.user_agent, self.timeout, self.robots), new)
            self.sites.update(zip(new, fetched, strict=True))

    def refusals(self, urls: list[str], refused: list[str | None]) -> list[str | None]:
        """Fill ``refused`` (None: allowed so far) with robots/TDM refusals for the rows still allowed."""
        parsed = [site_of(u) if r is None else None for u, r in zip(urls, refused, strict=True)]
        self._fetch({p[0] for p in parsed if p is not None})
        out = list(refused)
        for i, p in enumerate(parsed):
            if p is None:
                continue
            rules = self.sites[p[0]]
            if self.robots and rules.unavailable:
                out[i] = f"{rules.unavailable_reason}: {rules.unavailable}"
            elif self.robots and rules.robots is not None and not rules.robots.can_fetch(urls[i], self.token):
                out[i] = f"{ROBOTS_DISALLOWED}: robots.txt of {p[0]} disallows {p[2][:200]} for {self.token}"
            elif tdm_reserved(rules.tdm, p[2]):
                out[i] = f"{TDM_RESERVED}: {p[0]}/.well-known/tdmrep.json reserves {p[2][:200]}"
        return out

    def crawl_delays(self) -> dict[str, float]:
        """authority -> Crawl-delay (seconds) of the sites that set one (robots on)."""
        if not self.robots:
            return {}
        delays = {}
        for site, rules in self.sites.items():
            delay = rules.crawl_delay(self.token)
            if delay:
                authority = site.split("://", 1)[1]
                delays[authority] = max(delay, delays.get(authority, 0.0))
        return delays
