"""The network guard holds on every hop inside img2dataset's workers (spawned processes and Ray tasks): with
127.0.0.1/32 allowed as if public, a redirect to 127.0.0.2 (another loopback address, served by a real server that
would answer) is refused with its reason and hop, while redirect chains that stay on 127.0.0.1 still download."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tasks.ingest import ingest
from tasks.ingest.accounting import ROW_COL, reason
from vlforge import raw
from vlforge.demo.server import ImageServer, Response
from vlforge.demo.synth import make_pairs

pytestmark = pytest.mark.integration


def _redirect(target: str):
    def route(handler):
        handler.send_response(302)
        handler.send_header("Location", target)
        handler.end_headers()

    return route


@pytest.mark.parametrize("distributor", ["multiprocessing", pytest.param("ray", marks=pytest.mark.slow)])
def test_redirect_to_a_non_allowed_loopback_address_is_refused_in_the_workers(
    distributor, request, settings, image_server, tmp_path
):
    if distributor == "ray":
        request.getfixturevalue("ray_local")
    pairs = make_pairs(4, seed=5)
    urls = image_server.add_pairs(pairs)
    with ImageServer(host="127.0.0.2") as internal:
        internal.add("/secret.jpg", Response(pairs[0].image))  # answers if anything connects
        image_server.add("/hop2", _redirect(urls[3]))
        chain = image_server.add("/hop1", _redirect(image_server.url("/hop2")))  # stays on 127.0.0.1
        escape = image_server.add("/escape", _redirect(internal.url("/secret.jpg")))
        rows = [(urls[0], "a"), (urls[1], "b"), (chain, "c"), (escape, "d"), (urls[2], "e")]
        path = tmp_path / "list.csv"
        path.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))
        [result] = ingest(str(path), "web", settings, shard_size=5, processes=1, threads=2, timeout=5,
                          retries=0, distributor=distributor, allowed_networks=["127.0.0.1/32"])  # fmt: skip
        assert internal.hits == {}, "the worker connected to the refused address"
    assert result.counts == {"success": 4, "private_network": 1}
    assert image_server.hits["/hop1"] == image_server.hits["/hop2"] == 1
    out = {r[ROW_COL]: r for p in raw.shard_files(result.uri) for r in pq.read_table(p).to_pylist()}
    assert sorted(out) == [0, 1, 2, 3, 4]
    refused = out[3]
    assert reason(refused["status"], refused["error_message"]) == "private_network"
    assert f"redirect to {internal.url('/secret.jpg')} refused" in refused["error_message"]
    assert refused["jpg"] is None and out[2]["jpg"]
