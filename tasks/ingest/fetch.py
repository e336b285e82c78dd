"""The request img2dataset's workers make for each image, made compliant: vlforge replaces
``img2dataset.downloader.download_image_with_retry`` (the function its ``Downloader`` calls for every row) in each
worker process, while a :func:`compliant` block is active, with :func:`download_with_retry`, which

- sends the run's full user agent (``--user-agent``), not img2dataset's browser string;
- waits for the run-wide per-host gate (:mod:`tasks.ingest.politeness`) before each request;
- keeps img2dataset's ``X-Robots-Tag`` check, and refuses ``tdm-reservation: 1`` (reason ``tdm_reserved``) before
  reading the body;
- on 429 or 503 with ``Retry-After`` (429 without one: 1 s, doubling), holds the host back for every worker, waits
  and tries again, at most ``rate_limit_tries`` times, then ends the row ``rate_limited``;
- does not retry other 4xx answers (they will not change), retries the rest ``retries`` times as img2dataset does;
- follows no redirect to a URL the opt-out lists cover (reason ``opted_out``; the target is not contacted at all,
  not even for its robots.txt), and a redirect to another site only when that site's robots.txt and tdmrep.json
  allow the target (read once per site per worker process, with staging's conventions; reason
  ``robots_disallowed`` or ``tdm_reserved``);
- hashes the bytes against the PDQ blocklist (:mod:`tasks.ingest.blocklist`) and drops them on a match: img2dataset
  gets no bytes, only ``refused by vlforge: blocklisted: distance N``, so nothing of the image is ever written.
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from tasks.ingest.blocklist import BLOCKLISTED, BlocklistRef
from tasks.ingest.blocklist import match as blocklist_match
from tasks.ingest.optout import OptOutList
from tasks.ingest.politeness import GateAddress, GateClient
from tasks.ingest.robots import (
    ROBOTS_DISALLOWED,
    TDM_RESERVED,
    SiteRules,
    fetch_site,
    site_of,
    tdm_reserved,
)
from vlforge import netguard
from vlforge.netguard import REFUSED_PREFIX

RATE_LIMITED = "rate_limited"
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
XROBOTS_MESSAGE = (
    "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's text (accounting: opted_out)
)


@dataclass(frozen=True)
class CrawlPolicy:
    """How workers fetch (picklable: it travels with the downloader to every process and Ray task)."""

    user_agent: str
    gate: GateAddress | None = None
    blocklist: BlocklistRef | None = None
    rate_limit_tries: int = 3
    max_retry_after_s: float = 60.0  # a longer Retry-After is capped (the row then ends rate_limited sooner)
    robots: bool = True  # off with --ignore-robots-txt: a redirect's target site is then not asked either
    opt_out: OptOutList | None = None  # staging checks the listed URLs; the workers, redirect targets


class _RateLimited(Exception):
    def __init__(self, code: int, wait: float | None):
        super().__init__(f"HTTP Error {code}")
        self.code, self.wait = code, wait


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After``: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _authority(url: str) -> str:
    return urlsplit(url.strip()).netloc.rsplit("@", 1)[-1].lower()


class _RedirectRefused(Exception):
    """A redirect whose target an opt-out list covers, or whose target site's robots.txt or tdmrep.json refuses it
    (the text is the row's reason)."""


_sites: dict[tuple[str, bool], SiteRules] = {}
_sites_lock = threading.Lock()


def _site_rules(site: str, policy: CrawlPolicy, timeout) -> SiteRules:
    """A redirect target's rules, read once per site in this process (staging read those of the list's sites)."""
    key = (site, policy.robots)
    with _sites_lock:
        if key not in _sites:
            _sites[key] = fetch_site(site, policy.user_agent, timeout or 10, policy.robots)
        return _sites[key]


class _SiteAwareRedirect(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling (with the network guard's check), then the opt-out lists on every redirect
    target (a prefix may cover another path of the same site), then, when the redirect leaves the site the list
    named, the target site's robots.txt and tdmrep.json."""

    def __init__(self, policy: CrawlPolicy, token: str, timeout):
        self.policy, self.token, self.timeout = policy, token, timeout

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        # urllib's own handling first: the network guard refuses a target it does not permit (its reason, e.g.
        # private_network, is the row's), before anything is asked of the target site.
        follow = super().redirect_request(req, fp, code, msg, headers, newurl)
        if follow is not None and self.policy.opt_out:
            host, _ = netguard.parse_host(newurl)
            opted = self.policy.opt_out.refusal(newurl, host) if host else None
            if opted is not None:  # before anything, even its robots.txt, is asked of the target
                raise _RedirectRefused(f"{REFUSED_PREFIX}{opted}: redirect to {newurl[:200]}")
        target = site_of(newurl)
        if follow is None or target[0] == site_of(req.full_url)[0]:
            return follow
        if not target[0].startswith(("http://", "https://")):
            return follow
        rules = _site_rules(target[0], self.policy, self.timeout)
        where = f"redirect to {newurl[:200]}"
        if self.policy.robots and rules.unavailable:
            # as at staging: robots_unavailable (transient: --retry-failed asks again) or the network's reason
            raise _RedirectRefused(
                f"{REFUSED_PREFIX}{rules.unavailable_reason}: {where}: {rules.unavailable}"
            )
        if self.policy.robots and rules.robots is not None and not rules.robots.can_fetch(newurl, self.token):
            raise _RedirectRefused(
                f"{REFUSED_PREFIX}{ROBOTS_DISALLOWED}: {where}: robots.txt of {target[0]} disallows it for {self.token}"
            )
        if tdm_reserved(rules.tdm, target[2]):
            raise _RedirectRefused(
                f"{REFUSED_PREFIX}{TDM_RESERVED}: {where}: {target[0]}/.well-known/tdmrep.json reserves it"
            )
        return follow


_openers: dict[tuple[str, object], tuple[CrawlPolicy, urllib.request.OpenerDirector]] = {}
_openers_lock = threading.Lock()


def _opener(policy: CrawlPolicy, token: str, timeout) -> urllib.request.OpenerDirector:
    """The opener for ``policy`` in this process, shared by its threads (as urlopen's own is): building one per
    request would read the proxy settings from the whole environment each time, a cost comparable to the request.
    One is kept per token and timeout, for the latest policy (each shard brings its own unpickled copy)."""
    with _openers_lock:
        entry = _openers.get((token, timeout))
        if entry is None or entry[0] is not policy:
            if entry is None or entry[0] != policy:
                entry = (policy, urllib.request.build_opener(_SiteAwareRedirect(policy, token, timeout)))
            else:  # an equal copy (the next shard's): compared in full once, not on every request
                entry = (policy, entry[1])
            _openers[(token, timeout)] = entry
        return entry[1]


def _fetch_once(url: str, policy: CrawlPolicy, timeout, token, directives):
    """``(bytes, None)`` or ``(None, error_message)``; raises _RateLimited on 429/503."""
    from img2dataset.downloader import is_disallowed

    request = urllib.request.Request(url, data=None, headers={"User-Agent": policy.user_agent})
    opener = _opener(policy, token or "vlforge", timeout)
    try:
        with opener.open(request, timeout=timeout) as response:
            if directives and is_disallowed(response.headers, token, directives):
                return None, XROBOTS_MESSAGE
            if (response.headers.get("tdm-reservation") or "").strip() == "1":
                return None, f"{REFUSED_PREFIX}{TDM_RESERVED}: the response carries tdm-reservation: 1"
            return response.read(), None
    except urllib.error.HTTPError as exc:
        wait = retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
        exc.close()
        if exc.code == 429 or (exc.code == 503 and wait is not None):
            raise _RateLimited(exc.code, wait) from None
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - img2dataset keeps the text as the row's error_message
        return None, str(exc)


def _permanent(message: str) -> bool:
    """A refusal or a 4xx answer (but 408, a timeout): asking again gets the same answer."""
    if message.startswith(REFUSED_PREFIX) or message == XROBOTS_MESSAGE:
        return True
    status = _HTTP_STATUS.search(message)
    return status is not None and 400 <= int(status.group(1)) < 500 and status.group(1) != "408"


def download_with_retry(row, timeout, retries, user_agent_token, disallowed_header_directives):
    """img2dataset's ``download_image_with_retry`` contract: ``(key, BytesIO | None, error_message | None)``."""
    key, url = row
    try:
        stream, error = _fetch(url, timeout, retries, user_agent_token, disallowed_header_directives)
    except Exception as exc:  # noqa: BLE001 - e.g. the gate did not answer: a row's failure, not the shard's
        return key, None, f"{type(exc).__name__}: {exc}"
    return key, stream, error


def _fetch(url, timeout, retries, user_agent_token, disallowed_header_directives):
    policy, gate = _active, _gate()
    host = _authority(url)
    rate_tries = attempts = 0
    while True:
        try:
            with gate.slot(host) if gate is not None else contextlib.nullcontext():
                data, error = _fetch_once(
                    url, policy, timeout, user_agent_token, disallowed_header_directives
                )
        except _RateLimited as limited:
            rate_tries += 1
            if rate_tries >= policy.rate_limit_tries:
                return None, f"{REFUSED_PREFIX}{RATE_LIMITED}: HTTP {limited.code} after {rate_tries} tries"
            wait = min(limited.wait if limited.wait is not None else 2.0 ** (rate_tries - 1),
                       policy.max_retry_after_s)  # fmt: skip
            if gate is not None:
                gate.hold(host, wait)  # every worker holds back from this host, not only this thread
            time.sleep(wait)
            continue
        if data is not None:
            break
        attempts += 1
        if attempts > retries or _permanent(error):
            return None, error
    if policy.blocklist is not None:
        distance = blocklist_match(policy.blocklist, data)
        if distance is not None:
            del data  # the bytes go no further: no stream, no shard, no log
            return None, f"{REFUSED_PREFIX}{BLOCKLISTED}: distance {distance}"
    return io.BytesIO(data), None


# --- installation in the worker process -------------------------------------------------------------------

_active: CrawlPolicy | None = None
_clients: dict[GateAddress, GateClient] = {}
_KEPT_CLIENTS = 4
_install_lock = threading.Lock()
_original = None


def _gate() -> GateClient | None:
    address = _active.gate if _active is not None else None
    if address is None:
        return None
    with _install_lock:
        if address not in _clients:
            # A long-lived process (a Ray worker) sees a new gate each run: the clients of the oldest runs are let
            # go (their table's mapping and connections close once no request of theirs still holds them).
            while len(_clients) >= _KEPT_CLIENTS:
                del _clients[next(iter(_clients))]
            _clients[address] = GateClient(address)
        return _clients[address]


def _dispatch(row, timeout, retries, user_agent_token, disallowed_header_directives):
    if _active is None:
        return _original(row, timeout, retries, user_agent_token, disallowed_header_directives)
    return download_with_retry(row, timeout, retries, user_agent_token, disallowed_header_directives)


def _install() -> None:
    global _original
    import img2dataset.downloader as i2d_downloader

    with _install_lock:
        if _original is None:
            _original = i2d_downloader.download_image_with_retry
            i2d_downloader.download_image_with_retry = _dispatch


@contextlib.contextmanager
def compliant(policy: CrawlPolicy | None) -> Iterator[None]:
    """Make img2dataset's downloads in this process follow ``policy`` while the block runs."""
    global _active
    if policy is None:
        yield
        return
    _install()
    previous, _active = _active, policy
    try:
        yield
    finally:
        _active = previous
