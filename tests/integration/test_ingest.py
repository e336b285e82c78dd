"""Ingest against a real HTTP server on loopback: good images, every failure kind, re-runs, new lists, the guard."""

from __future__ import annotations

import io
import socket
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.ingest import ingest
from tasks.ingest.accounting import ROW_COL, reason
from vlforge import raw, storage
from vlforge.demo.server import Response
from vlforge.demo.synth import make_pairs

pytestmark = pytest.mark.integration

FAST = dict(processes=1, threads=4, timeout=1.0, retries=1, allow_private_networks=True)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slow(seconds: float):
    def route(handler):
        time.sleep(seconds)
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "image/jpeg")
            handler.end_headers()
        except OSError:
            pass

    return route


def _redirect(target: str):
    def route(handler):
        handler.send_response(302)
        handler.send_header("Location", target)
        handler.end_headers()

    return route


def _write_csv(path, rows: list[tuple[str, str]], extra: str | None = None) -> str:
    with open(path, "w") as f:
        f.write("url,caption" + (",note" if extra else "") + "\n")
        for i, (url, cap) in enumerate(rows):
            f.write(f"{url},{cap}" + (f",{extra}{i}" if extra else "") + "\n")
    return str(path)


def _batch_rows(uri: str):
    tables = [pq.read_table(p) for p in raw.shard_files(uri)]
    return [row for t in tables for row in t.to_pylist()]


def _record_ua(image: bytes, seen: list[str]):
    def route(handler):
        seen.append(handler.headers.get("User-Agent", ""))
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(image)))
        handler.end_headers()
        handler.wfile.write(image)

    return route


def _cases(srv, user_agents: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (url, expected reason)."""
    pairs = make_pairs(3, seed=1)
    jpeg = pairs[0].image
    rgba = Image.new("RGBA", (48, 40), (200, 10, 10, 128))
    cmyk = Image.new("CMYK", (40, 48), (0, 200, 200, 0))
    bomb = _encode(Image.new("1", (4000, 4000)), "PNG")  # 16 Mpx from a few kB
    srv.add("/good.jpg", _record_ua(jpeg, user_agents))
    srv.add("/alpha.png", Response(_encode(rgba, "PNG"), "image/png"))
    srv.add("/cmyk.jpg", Response(_encode(cmyk, "JPEG")))
    srv.add("/redirect", _redirect(srv.url("/good.jpg")))
    srv.add("/e500", Response(b"oops", "text/plain", status=500))
    srv.add("/slow.jpg", _slow(3.0))
    srv.add("/page.html", Response(b"<html><body>not an image</body></html>", "text/html"))
    srv.add("/truncated.jpg", Response(jpeg[: len(jpeg) // 2]))
    srv.add("/corrupt.jpg", Response(jpeg[:30] + bytes(range(256)) * 4 + jpeg[1054:]))
    srv.add("/empty.jpg", Response(b""))
    srv.add("/tiny.png", Response(_encode(Image.new("RGB", (4, 4)), "PNG"), "image/png"))
    srv.add("/bomb.png", Response(bomb, "image/png"))
    srv.add("/noai.jpg", Response(jpeg, headers={"X-Robots-Tag": "noai"}))
    srv.add("/noindex-ua.jpg", Response(jpeg, headers={"X-Robots-Tag": "vlforge: noindex"}))
    srv.add("/otherbot.jpg", Response(jpeg, headers={"X-Robots-Tag": "otherbot: noai"}))
    return {
        "jpeg": (srv.url("/good.jpg"), "success"),
        "png_alpha": (srv.url("/alpha.png"), "success"),
        "cmyk": (srv.url("/cmyk.jpg"), "success"),
        "redirect": (srv.url("/redirect"), "success"),
        "other_bot_optout": (srv.url("/otherbot.jpg"), "success"),
        "http_404": (srv.url("/missing.jpg"), "http_404"),
        "http_500": (srv.url("/e500"), "http_500"),
        "timeout": (srv.url("/slow.jpg"), "timeout"),
        "refused": (f"http://127.0.0.1:{_closed_port()}/x.jpg", "connection_refused"),
        "bad_scheme": ("ftp://127.0.0.1/x.jpg", "bad_scheme"),
        "malformed": ("http://", "malformed_url"),
        "not_image": (srv.url("/page.html"), "undecodable_image"),
        "truncated": (srv.url("/truncated.jpg"), "undecodable_image"),
        "corrupt": (srv.url("/corrupt.jpg"), "undecodable_image"),
        "empty": (srv.url("/empty.jpg"), "empty_body"),
        "too_small": (srv.url("/tiny.png"), "too_small"),
        "bomb": (srv.url("/bomb.png"), "decompression_bomb"),
        "noai": (srv.url("/noai.jpg"), "opted_out"),
        "noindex_for_us": (srv.url("/noindex-ua.jpg"), "opted_out"),
    }


@pytest.mark.slow
def test_every_row_gets_success_or_its_failure_reason(settings, image_server, tmp_path):
    user_agents: list[str] = []
    cases = _cases(image_server, user_agents)
    names = list(cases)
    path = _write_csv(tmp_path / "list.csv", [(cases[n][0], n) for n in names], extra="n")
    with open(path, "a") as f:
        f.write("a,b,c,d\n")  # a row the CSV parser cannot split: reported, never dropped
    names.append("unsplittable")
    cases["unsplittable"] = ("", "malformed_row")
    [result] = ingest(path, "web", settings, shard_size=8, max_image_area=4_000_000, **FAST)

    assert not result.skipped and result.rows == len(names)
    assert raw.list_raw_batches(settings, "web") == [result.batch_id]
    rows = _batch_rows(result.uri)
    assert sorted(r[ROW_COL] for r in rows) == list(range(len(names)))  # every list row exactly once
    by_row = {r[ROW_COL]: r for r in rows}
    for i, name in enumerate(names):
        row = by_row[i]
        assert reason(row["status"], row["error_message"]) == cases[name][1], (name, row["error_message"])
        if name != "unsplittable":
            assert row["note"] == f"n{i}"  # extra columns carried through
    expected = {}
    for _, want in cases.values():
        expected[want] = expected.get(want, 0) + 1
    assert result.counts == expected
    assert result.success_rate == pytest.approx(5 / len(names))
    for name in ("png_alpha", "cmyk", "jpeg"):
        img = Image.open(io.BytesIO(by_row[names.index(name)]["jpg"]))
        assert img.mode == "RGB"
    assert user_agents
    assert all("vlforge" in ua for ua in user_agents)  # a user agent naming vlforge

    summary = storage.read_json(storage.join(result.uri, raw.SUCCESS))
    assert summary["counts"] == expected and summary["mlflow_run_id"] == result.mlflow_run_id
    import mlflow

    run = mlflow.MlflowClient(settings.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags["vlforge.source"] == "web"
    assert run.data.tags["vlforge.raw_batch"] == result.batch_id
    assert run.data.tags["vlforge.url_list"] == path
    assert run.data.metrics["count.http_404"] == 1
    assert run.data.metrics["success_rate"] == pytest.approx(result.success_rate)


def _serve_pairs(srv, n: int, prefix: str) -> list[tuple[str, str]]:
    pairs = make_pairs(n, seed=3, prefix=prefix)
    return list(zip(srv.add_pairs(pairs), [p.caption for p in pairs], strict=True))


@pytest.mark.slow
def test_same_list_again_is_a_noop_and_a_new_list_downloads_only_itself(settings, image_server, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    first = _serve_pairs(image_server, 6, "a")
    _write_csv(lists / "one.csv", first)
    [r1] = ingest(str(lists), "web", settings, shard_size=4, **FAST)
    assert not r1.skipped and r1.counts == {"success": 6}
    hits = dict(image_server.hits)

    [again] = ingest(str(lists / "one.csv"), "web", settings, shard_size=4, **FAST)
    assert again.skipped and again.batch_id == r1.batch_id and again.counts == {"success": 6}
    assert again.mlflow_run_id == r1.mlflow_run_id
    assert image_server.hits == hits  # nothing fetched again

    second = _serve_pairs(image_server, 3, "b")
    _write_csv(lists / "two.csv", second)
    results = ingest(str(lists), "web", settings, shard_size=4, **FAST)
    assert [r.skipped for r in results] == [True, False]
    assert results[1].counts == {"success": 3}
    for url, _ in first:
        assert image_server.hits["/" + url.split("/", 3)[3]] == 1
    assert sorted(raw.list_raw_batches(settings, "web")) == sorted([r1.batch_id, results[1].batch_id])


def test_guard_refuses_loopback_hosts_without_fetching_them(settings, image_server, tmp_path):
    rows = _serve_pairs(image_server, 3, "g") + [
        ("http://localhost:9/x.jpg", "local"),
        ("file:///etc/passwd", "f"),
    ]
    path = _write_csv(tmp_path / "list.csv", rows)
    [result] = ingest(path, "web", settings, processes=1, threads=2, timeout=1.0, retries=0)
    assert result.counts == {"private_network": 4, "bad_scheme": 1}
    assert image_server.hits == {}
    out = _batch_rows(result.uri)
    assert sorted(r[ROW_COL] for r in out) == list(range(5))
    assert all("--allow-private-networks" in r["error_message"] for r in out if r["url"].startswith("http"))
