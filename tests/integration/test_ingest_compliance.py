"""Crawl compliance against real sites on several loopback addresses (127.0.0.2-127.0.0.9), asserted from the server
side: what robots.txt, tdmrep.json, the TDM header, opt-out lists and Retry-After forbid is never requested (or not
kept), Crawl-delay and the per-host limits hold over several workers, blocklisted images are never stored, and
``--retry-failed`` fetches only what failed transiently."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from tasks.ingest import ingest
from tasks.ingest.accounting import ROW_COL, reason
from tasks.ingest.blocklist import hash_hex, nearest, pdq_hash
from vlforge import raw, storage
from vlforge.demo.server import ImageServer, Response
from vlforge.demo.synth import make_pairs

pytestmark = pytest.mark.integration

LOOPBACK = dict(allowed_networks=["127.0.0.0/8"], timeout=2.0, retries=0, shard_size=50)


class Log:
    """Arrival and end times, and the most requests in flight at once, per path prefix."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[tuple[str, float, float]] = []
        self.active = 0
        self.max_active = 0

    def serve(self, body: bytes, delay: float = 0.0, status: int = 200, headers: dict | None = None):
        def route(handler):
            start = time.monotonic()
            with self.lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            time.sleep(delay)
            with self.lock:
                self.active -= 1
                self.requests.append((handler.path, start, time.monotonic()))
            handler.send_response(status)
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.send_header("Content-Type", "image/jpeg")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        return route

    def starts(self, prefix: str = "/") -> list[float]:
        return sorted(s for p, s, _ in self.requests if p.startswith(prefix))


def _csv(path, urls: list[str]) -> str:
    path.write_text("url,caption\n" + "".join(f"{u},c{i}\n" for i, u in enumerate(urls)))
    return str(path)


def _rows(uri: str) -> dict[int, dict]:
    return {r[ROW_COL]: r for p in raw.shard_files(uri) for r in pq.read_table(p).to_pylist()}


def _reasons(uri: str) -> dict[int, str]:
    return {i: reason(r["status"], r["error_message"]) for i, r in _rows(uri).items()}


def _photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth random picture (distinct PDQ hashes, unlike the flat synthetic shapes)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _redirect(origin, path: str, there: str) -> str:
    """The URL of ``path`` on ``origin``, which answers with a 302 to ``there``."""
    return origin.add(path, Response(b"", status=302, headers={"Location": there}))


def test_a_redirect_to_another_site_asks_that_sites_robots_txt_first(settings, tmp_path):
    image = make_pairs(1, seed=2)[0].image
    with ImageServer("127.0.0.2") as origin, ImageServer("127.0.0.3") as target:
        target.add("/robots.txt", Response(b"User-agent: vlforge\nDisallow: /private/\n", "text/plain"))
        target.add("/.well-known/tdmrep.json",
                   Response(b'[{"location": "/reserved/*", "tdm-reservation": 1}]', "application/json"))  # fmt: skip
        urls = []
        for i in range(3):
            for folder in ("private", "reserved", "open"):
                there = target.add(f"/{folder}/{i}.jpg", Response(image))
                urls.append(_redirect(origin, f"/go/{folder}/{i}.jpg", there))
        path = _csv(tmp_path / "list.csv", urls)
        [result] = ingest(path, "web", settings, processes=1, threads=4, **LOOPBACK)

        assert not any(p.startswith(("/private/", "/reserved/")) for p in target.hits), target.hits
        assert sum(n for p, n in target.hits.items() if p.startswith("/open/")) == 3
        assert target.hits["/robots.txt"] == 1  # once for the run's worker process, not once per redirect
        assert result.counts == {"success": 3, "robots_disallowed": 3, "tdm_reserved": 3}


def test_robots_txt_is_read_once_per_site_and_obeyed(settings, tmp_path):
    image = make_pairs(1, seed=1)[0].image
    with (
        ImageServer("127.0.0.2") as a,
        ImageServer("127.0.0.3") as b,
        ImageServer("127.0.0.4") as c,
        ImageServer("127.0.0.5") as d,
    ):
        a.add("/robots.txt", Response(b"User-agent: *\nDisallow: /private/\n\nUser-agent: vlforge\n"
                                      b"Disallow: /private/\nDisallow: /novl/\n", "text/plain"))  # fmt: skip
        c.add("/robots.txt", Response(b"oops", "text/plain", status=503))
        d.add("/robots.txt", Response(b"User-agent: otherbot\nDisallow: /\n", "text/plain"))
        urls = []
        for i in range(4):
            for srv in (a, b, c, d):
                urls.append(srv.add(f"/ok/{i}.jpg", Response(image)))
            urls.append(a.add(f"/private/{i}.jpg", Response(image)))
            urls.append(a.add(f"/novl/{i}.jpg", Response(image)))
        path = _csv(tmp_path / "list.csv", urls)
        [result] = ingest(path, "web", settings, processes=2, threads=4, **LOOPBACK)

        assert not any(p.startswith(("/private/", "/novl/")) for p in a.hits), a.hits
        assert not any(p.startswith("/ok/") for p in c.hits), (
            "a site whose robots.txt answers 5xx was fetched"
        )
        for srv in (a, b, c, d):  # once per site, though two processes of four threads downloaded
            assert srv.hits["/robots.txt"] == 1
        assert result.counts == {"success": 12, "robots_disallowed": 8, "robots_unavailable": 4}
        by_row = _reasons(result.uri)
        for i, url in enumerate(urls):
            want = ("robots_disallowed" if "/private/" in url or "/novl/" in url
                    else "robots_unavailable" if url.startswith(c.base_url) else "success")  # fmt: skip
            assert by_row[i] == want, url

        import mlflow

        run = mlflow.MlflowClient(settings.tracking_uri).get_run(result.mlflow_run_id)
        assert run.data.tags["vlforge.robots_txt"] == "respected"
        assert run.data.metrics["count.robots_disallowed"] == 8 and run.data.metrics["count.blocklisted"] == 0

        # Switched off explicitly: robots.txt is not read, the disallowed paths are fetched, the run says so.
        [off] = ingest(path, "other", settings, processes=1, threads=4, ignore_robots_txt=True, **LOOPBACK)
        assert a.hits["/robots.txt"] == 1 and a.hits["/private/0.jpg"] == 1
        assert off.counts == {"success": len(urls)}
        run = mlflow.MlflowClient(settings.tracking_uri).get_run(off.mlflow_run_id)
        assert run.data.tags["vlforge.robots_txt"].startswith("ignored")
        summary = storage.read_json(storage.join(off.uri, raw.SUCCESS))
        assert summary["compliance"]["robots_txt"].startswith("ignored")


def test_crawl_delay_spaces_requests_to_its_host_over_all_workers(settings, tmp_path):
    image = make_pairs(1, seed=1)[0].image
    log = Log()
    with ImageServer("127.0.0.2") as slow, ImageServer("127.0.0.3") as fast:
        slow.add("/robots.txt", Response(b"User-agent: *\nCrawl-delay: 0.4\n", "text/plain"))
        urls = [slow.add(f"/img/{i}.jpg", log.serve(image)) for i in range(6)]
        urls += [fast.add(f"/img/{i}.jpg", Response(image)) for i in range(6)]
        path = _csv(tmp_path / "list.csv", urls)
        [result] = ingest(path, "web", settings, processes=2, threads=4, shard_size=3,
                          **{k: v for k, v in LOOPBACK.items() if k != "shard_size"})  # fmt: skip
    assert result.counts == {"success": 12}
    gaps = np.diff(log.starts())
    assert len(gaps) == 5 and gaps.min() >= 0.39, gaps  # the delay, though shards ran in two processes
    assert log.max_active == 1


def test_tdm_reservation_header_and_tdmrep_json(settings, tmp_path):
    image = make_pairs(1, seed=1)[0].image
    with ImageServer("127.0.0.2") as a, ImageServer("127.0.0.3") as b:
        b.add("/.well-known/tdmrep.json", Response(
            b'[{"location": "/reserved/*", "tdm-reservation": 1},'
            b' {"location": "/*", "tdm-reservation": 0}]', "application/json"))  # fmt: skip
        free = [a.add(f"/free/{i}.jpg", Response(image)) for i in range(3)]
        header = [a.add(f"/tdm/{i}.jpg", Response(image, headers={"tdm-reservation": "1"})) for i in range(3)]
        noai = [a.add(f"/noai/{i}.jpg", Response(image, headers={"X-Robots-Tag": "noai"})) for i in range(2)]
        reserved = [b.add(f"/reserved/{i}.jpg", Response(image)) for i in range(3)]
        open_b = [b.add(f"/open/{i}.jpg", Response(image)) for i in range(2)]
        urls = free + header + noai + reserved + open_b
        [result] = ingest(_csv(tmp_path / "l.csv", urls), "web", settings, processes=1, threads=4, **LOOPBACK)
        assert not any(p.startswith("/reserved/") for p in b.hits)  # tdmrep.json: never requested
        assert b.hits["/.well-known/tdmrep.json"] == 1
    assert result.counts == {"success": 5, "tdm_reserved": 6, "opted_out": 2}
    rows = _rows(result.uri)
    for i, url in enumerate(urls):
        if "/tdm/" in url or "/reserved/" in url:
            assert reason(rows[i]["status"], rows[i]["error_message"]) == "tdm_reserved"
            assert rows[i]["jpg"] is None


def test_opt_out_lists_by_domain_and_prefix_are_applied_before_any_request(settings, tmp_path):
    image = make_pairs(1, seed=1)[0].image
    with ImageServer("127.0.0.2") as a, ImageServer("127.0.0.3") as b, ImageServer("127.0.0.4") as c:
        urls = []
        for i in range(3):
            urls += [a.add(f"/gallery/{i}.jpg", Response(image)), a.add(f"/public/{i}.jpg", Response(image))]
            urls += [b.add(f"/x/{i}.jpg", Response(image)), c.add(f"/y/{i}.jpg", Response(image))]
        first = tmp_path / "sites.txt"
        first.write_text(
            f"# asked on 2026-11-30\n127.0.0.3   # the whole host\n\n{a.base_url.upper()}/gallery/\n"
        )
        second = tmp_path / "more.txt"
        second.write_text(f"{c.url('/y/1.jpg')}\n")
        [result] = ingest(_csv(tmp_path / "l.csv", urls), "web", settings, processes=1, threads=4,
                          opt_out_lists=[str(first), str(second)], **LOOPBACK)  # fmt: skip
        assert b.hits == {}, "an opted-out host was contacted (not even robots.txt may be)"
        assert not any(p.startswith("/gallery/") for p in a.hits) and "/y/1.jpg" not in c.hits
    assert result.counts == {"success": 5, "opted_out": 7}
    summary = storage.read_json(storage.join(result.uri, raw.SUCCESS))
    assert [o["file"] for o in summary["compliance"]["opt_out_lists"]] == [str(first), str(second)]
    card = _card(settings, result.batch_id)  # what a dataset curated from this batch says about its crawl
    digest = hashlib.sha256(first.read_bytes()).hexdigest()[:16]
    assert f"`{first}` (sha256 `{digest}`)" in card and "| respected | respected |" in card


def test_a_redirect_to_an_opted_out_domain_or_prefix_is_not_followed(settings, tmp_path):
    image = make_pairs(1, seed=3)[0].image
    with (
        ImageServer("127.0.0.2") as origin,
        ImageServer("127.0.0.3") as target,
        ImageServer("127.0.0.4") as other,
    ):
        urls = []
        for i in range(2):
            for n, (site, folder) in enumerate(((target, "any"), (other, "gallery"), (other, "public"),
                                                (origin, "gallery"))):  # fmt: skip
                there = site.add(f"/{folder}/{i}.jpg", Response(image))
                urls.append(_redirect(origin, f"/go/{n}/{folder}/{i}.jpg", there))
        listed = tmp_path / "opt-out.txt"  # the list names none of the listed URLs: only where they redirect
        listed.write_text(f"127.0.0.3\n{other.base_url}/gallery/\n{origin.base_url}/gallery/\n")
        [result] = ingest(_csv(tmp_path / "l.csv", urls), "web", settings, processes=1, threads=4,
                          opt_out_lists=[str(listed)], **LOOPBACK)  # fmt: skip

        assert target.hits == {}, "an opted-out redirect target was contacted (not even robots.txt may be)"
        assert not any(p.startswith("/gallery/") for p in other.hits | origin.hits), (other.hits, origin.hits)
        assert sum(n for p, n in other.hits.items() if p.startswith("/public/")) == 2
    assert result.counts == {"success": 2, "opted_out": 6}
    rows = _rows(result.uri)
    refused = [r["error_message"] for r in rows.values() if r["status"] != "success"]
    assert all("redirect to" in m and "opt-out list" in m for m in refused), refused
    assert all(r["jpg"] is None for r in rows.values() if r["status"] != "success")


def _card(settings, batch_id: str) -> str:
    from tasks.curate.card import render_card
    from vlforge.datasets import DatasetVersion

    manifest = {"raw_batches": [raw.batch_lineage(settings, "web", batch_id)], "counts": {}}
    return render_card(DatasetVersion("d", "v1", "/nowhere", manifest))


def _limited(log: Log, image: bytes, fail_first: int, status: int, retry_after: str | None):
    """Answers ``status`` (with Retry-After) to the first ``fail_first`` requests, then the image."""
    count = [0]

    def route(handler):
        count[0] += 1
        log.requests.append((handler.path, time.monotonic(), time.monotonic()))
        if count[0] <= fail_first:
            handler.send_response(status)
            if retry_after is not None:
                handler.send_header("Retry-After", retry_after)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(image)))
        handler.end_headers()
        handler.wfile.write(image)

    return route


def test_retry_after_is_honoured_then_rows_end_rate_limited(settings, tmp_path):
    image = make_pairs(1, seed=1)[0].image
    log = Log()
    with ImageServer("127.0.0.2") as a, ImageServer("127.0.0.3") as b:
        urls = [
            a.add("/429-once.jpg", _limited(log, image, 1, 429, "1")),
            b.add("/503-once.jpg", _limited(log, image, 1, 503, "1")),
            a.add("/429-always.jpg", _limited(log, image, 99, 429, "0")),
            b.add("/503-always.jpg", _limited(log, image, 99, 503, "0")),
        ]
        [result] = ingest(_csv(tmp_path / "l.csv", urls), "web", settings, processes=1, threads=4,
                          rate_limit_tries=3, **LOOPBACK)  # fmt: skip
        assert a.hits["/429-always.jpg"] == 3 and b.hits["/503-always.jpg"] == 3  # bounded tries
    assert result.counts == {"success": 2, "rate_limited": 2}
    for path in ("/429-once.jpg", "/503-once.jpg"):
        first, second = log.starts(path)
        assert second - first >= 0.95  # the Retry-After of one second was waited out


@pytest.mark.slow
@pytest.mark.parametrize("distributor", ["multiprocessing", "ray"])
def test_per_host_limits_hold_over_all_workers(distributor, request, settings, tmp_path):
    if distributor == "ray":
        request.getfixturevalue("ray_local")
    image = make_pairs(1, seed=1)[0].image
    log, other = Log(), Log()
    with ImageServer("127.0.0.2") as a, ImageServer("127.0.0.3") as b:
        urls = [a.add(f"/img/{i}.jpg", log.serve(image, delay=0.15)) for i in range(24)]
        urls += [b.add(f"/img/{i}.jpg", other.serve(image, delay=0.15)) for i in range(8)]
        [result] = ingest(_csv(tmp_path / "l.csv", urls), "web", settings, processes=3, threads=8,
                          distributor=distributor, max_connections_per_host=2, max_requests_per_host_per_s=8,
                          **{**LOOPBACK, "shard_size": 8})  # fmt: skip
    assert result.counts == {"success": 32}
    assert log.max_active <= 2, log.max_active  # three processes of eight threads, yet two in flight at most
    starts = np.array(log.starts())
    assert np.diff(starts).min() >= 1 / 8 - 0.02  # 8 requests a second at most
    assert other.max_active <= 2


def test_blocklisted_images_are_never_stored(settings, tmp_path):
    photos = [_photo(seed) for seed in range(6)]
    served = {f"/p/{i}.jpg": _jpeg(p) for i, p in enumerate(photos)}
    listed = [served["/p/0.jpg"], served["/p/1.jpg"]]  # blocklisted as served
    reencoded = _jpeg(photos[2].resize((200, 150)), quality=60)  # the list has the original's hash
    served["/p/2-small.jpg"] = reencoded
    hashes = [pdq_hash(b) for b in (*listed, served["/p/2.jpg"])]
    blocklist = tmp_path / "pdq.txt"
    blocklist.write_text(
        "# from a hash-sharing programme\n" + "".join(f"{hash_hex(h)},100\n" for h in hashes)
    )
    with ImageServer("127.0.0.2") as a:
        urls = [a.add(p, Response(body)) for p, body in served.items()]
        [result] = ingest(_csv(tmp_path / "l.csv", urls), "web", settings, processes=1, threads=4,
                          blocklist=str(blocklist), **LOOPBACK)  # fmt: skip
    assert result.counts == {"success": 3, "blocklisted": 4}
    rows = _rows(result.uri)
    for i, p in enumerate(served):
        row = rows[i]
        if p in ("/p/0.jpg", "/p/1.jpg", "/p/2.jpg", "/p/2-small.jpg"):
            assert reason(row["status"], row["error_message"]) == "blocklisted"
            assert row["jpg"] is None and row["sha256"] is None and row["url"] == urls[i]
            assert row["error_message"].endswith(tuple(f"distance {d}" for d in range(32)))
    # What was stored: no image within the threshold of a listed hash (the same scan finds the others) ...
    stored = [pdq_hash(r["jpg"]) for r in rows.values() if r["jpg"] is not None]
    listed_hashes = np.stack(hashes)
    assert min(nearest(listed_hashes, h) for h in stored) > 31
    assert nearest(np.stack(stored), pdq_hash(served["/p/3.jpg"])) <= 31
    # ... and no file under storage holds the blocklisted bytes (shards, stats, logs, staging, MLflow).
    # (64 bytes from the middle of each: entropy-coded data, not the tables every JPEG encoder shares)
    needles = [n[len(n) // 2 : len(n) // 2 + 64] for n in (*listed, reencoded, served["/p/2.jpg"])]
    files = [os.path.join(root, name) for root, _, names in os.walk(settings.storage_uri) for name in names]
    assert len(files) > 5
    for file in files:
        with open(file, "rb") as f:
            data = f.read()
        assert not any(n in data for n in needles), file
    summary = storage.read_json(storage.join(result.uri, raw.SUCCESS))
    assert summary["compliance"]["blocklist"]["hashes"] == 3
    digest = hashlib.sha256(blocklist.read_bytes()).hexdigest()[:16]
    assert f"sha256 `{digest}`, 3 PDQ hashes, distance <= 31" in _card(settings, result.batch_id)


def test_retry_failed_fetches_only_rows_that_failed_transiently(settings, tmp_path):
    image = make_pairs(1, seed=1)[0].image
    log = Log()
    with ImageServer("127.0.0.2") as a:
        a.add("/robots.txt", Response(b"User-agent: *\nDisallow: /private/\n", "text/plain"))
        urls = [
            a.add("/ok.jpg", Response(image)),
            a.add("/flaky-503.jpg", _limited(log, image, 1, 503, None)),  # 5xx: transient
            a.add("/flaky-429.jpg", _limited(log, image, 2, 429, "0")),  # rate_limited after 2 tries
            a.add("/gone.jpg", Response(b"", status=404)),  # permanent
            a.add("/tdm.jpg", Response(image, headers={"tdm-reservation": "1"})),  # refused on purpose
            a.add("/private/x.jpg", Response(image)),  # robots: never requested
        ]
        path = _csv(tmp_path / "l.csv", urls)
        common = dict(processes=1, threads=2, rate_limit_tries=2, **LOOPBACK)
        [first] = ingest(path, "web", settings, **common)
        assert first.counts == {"success": 1, "http_503": 1, "rate_limited": 1, "http_404": 1,
                                "tdm_reserved": 1, "robots_disallowed": 1}  # fmt: skip
        before = dict(a.hits)
        [again] = ingest(path, "web", settings, **common)  # without the flag: nothing to do
        assert again.skipped and a.hits == before
        [retried] = ingest(path, "web", settings, retry_failed=True, **common)
        changed = {p: a.hits[p] - before.get(p, 0) for p in a.hits if a.hits[p] != before.get(p, 0)}
    # robots.txt and tdmrep.json are read again (the retry is a new run), the flaky images once more, nothing else
    assert changed == {
        "/flaky-503.jpg": 1,
        "/flaky-429.jpg": 1,
        "/robots.txt": 1,
        "/.well-known/tdmrep.json": 1,
    }
    assert not retried.skipped and retried.batch_id == first.batch_id
    assert retried.counts == {"success": 3, "http_404": 1, "tdm_reserved": 1, "robots_disallowed": 1}
    rows = _rows(retried.uri)
    assert sorted(rows) == list(range(len(urls)))  # every list row still exactly once
    assert rows[1]["jpg"] and rows[2]["jpg"]
    summary = storage.read_json(storage.join(retried.uri, raw.SUCCESS))
    assert summary["counts"] == retried.counts and summary["retried"]["rows"] == 2
    assert not storage.exists(storage.join(retried.uri, "_retry"))


def test_gate_serves_many_clients_connecting_at_once_and_bounds_them():
    """Every worker thread of every process connects when a run starts: none may be left unanswered. Workers on
    the driver's machine use the gate's table, others (Ray nodes) its TCP server: the limit holds over both."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace
    from multiprocessing import AuthenticationError

    from tasks.ingest.politeness import GateClient, HostGate, serve

    lock, state = threading.Lock(), {"active": 0, "max": 0, "done": 0}

    def request(client: GateClient) -> None:
        with client.slot("site:80"):
            with lock:
                state["active"] += 1
                state["max"] = max(state["max"], state["active"])
            time.sleep(0.01)
            with lock:
                state["active"] -= 1
                state["done"] += 1

    with serve(HostGate(connections=4, rate=1000.0)) as address:
        table = GateClient(address)  # one table for all of a process's threads
        remote = GateClient(replace(address, table=None))  # one connection per thread, as on another node
        assert table.table is not None and remote.table is None
        with ThreadPoolExecutor(96) as pool:
            list(pool.map(lambda i: request(table if i % 2 else remote), range(96)))
        wrong = GateClient(type(address)(address.host, address.port, b"not the key"))
        with pytest.raises(AuthenticationError):  # the run's random key is needed
            wrong._call("acquire", "site:80")
    assert state["done"] == 96 and state["max"] <= 4
    assert not os.path.exists(address.table)  # the run's table is gone with the run
