"""``distributor="ray"`` hands the shards to img2dataset's Ray distributor on the session's local Ray."""

from __future__ import annotations

import pytest

from tasks.ingest import ingest
from vlforge import raw
from vlforge.demo.server import write_url_list
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ray_distributor_downloads_every_shard(settings, image_server, tmp_path, ray_local):
    pairs = make_pairs(6, seed=11)
    path = write_url_list(str(tmp_path / "list.csv"), pairs, image_server.add_pairs(pairs))
    [result] = ingest(path, "web", settings, shard_size=3, threads=2, timeout=5, retries=0,
                      distributor="ray", allow_private_networks=True)  # fmt: skip
    assert result.counts == {"success": 6}
    assert len(raw.shard_files(result.uri)) == 2
    assert all(image_server.hits["/img/" + p.key + ".jpg"] == 1 for p in pairs)
