"""Core: settings, storage, dataset versions (manifest last, LATEST, pinning), demo data and server."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import urllib.request

import pyarrow as pa
import pytest
from PIL import Image

from tests.helpers import publish_synthetic_dataset
from vlforge import storage
from vlforge.datasets import DatasetRef, VersionWriter, list_versions, resolve_dataset
from vlforge.demo.server import ImageServer, Response, write_url_list
from vlforge.demo.synth import COLOURS, SHAPES, make_pairs
from vlforge.errors import DatasetNotFoundError
from vlforge.settings import get_settings


def test_settings_defaults_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("VLFORGE_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    s = get_settings()
    assert s.storage_uri == str(tmp_path / ".vlforge")
    assert s.tracking_uri == f"sqlite:///{tmp_path}/.vlforge/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("VLFORGE_STORAGE", "s3://bucket/prefix/")
    monkeypatch.setenv("VLFORGE_RAY_ADDRESS", "ray://head:10001")
    s = get_settings()
    assert s.tracking_uri == "http://127.0.0.1:5000"
    assert s.storage_uri == "s3://bucket/prefix" and s.storage_is_remote
    assert s.ray_address == "ray://head:10001"
    assert get_settings(storage="/x").storage_uri == "/x"


def test_atomic_write_replaces_whole_file(tmp_path):
    uri = str(tmp_path / "a" / "b.json")
    storage.write_json_atomic(uri, {"n": 1})
    storage.write_json_atomic(uri, {"n": 2})
    assert storage.read_json(uri) == {"n": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temp files left behind


def test_dataset_version_publish_resolve_and_pin(settings):
    dv1, _ = publish_synthetic_dataset(settings, "toy", n=8)
    dv2, _ = publish_synthetic_dataset(settings, "toy", n=12, seed=1)
    assert dv1.version < dv2.version
    assert resolve_dataset(settings, "toy").version == dv2.version
    assert resolve_dataset(settings, f"toy@{dv1.version}").read_table().num_rows == 8
    assert resolve_dataset(settings, "toy").read_table(columns=["key"]).num_rows == 12
    assert (
        storage.read_text(storage.join(settings.storage_uri, "datasets", "toy", "LATEST")).strip()
        == dv2.version
    )
    assert dv2.manifest["content_hash"] and dv2.manifest["parts"] == {"data": 1}


def test_unfinished_version_is_invisible(settings):
    dv, _ = publish_synthetic_dataset(settings, "toy", n=4)
    w = VersionWriter(settings, "toy")
    w.write_table("data", pa.table({"key": ["x"]}))  # never published
    assert list_versions(settings, "toy") == [dv.version]
    assert resolve_dataset(settings, "toy").version == dv.version
    with pytest.raises(DatasetNotFoundError, match="no complete version"):
        resolve_dataset(settings, f"toy@{w.version}")


def test_unknown_dataset_error_names_it_and_the_fix(settings):
    publish_synthetic_dataset(settings, "known", n=2)
    with pytest.raises(DatasetNotFoundError) as err:
        resolve_dataset(settings, "nope")
    assert "'nope'" in str(err.value) and "known" in str(err.value) and "vlforge curate" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="invalid dataset name"):
        DatasetRef.parse("../etc")


def _publish_one(storage_root: str, q) -> None:
    s = get_settings(storage=storage_root)
    w = VersionWriter(s, "race")
    for i in range(3):
        w.write_table("data", pa.table({"key": [f"{w.version}-{i}"]}))
    q.put(w.publish({"counts": {"kept": 3}}).version)


def test_concurrent_publishers_never_mix_and_latest_is_newest(settings):
    q = mp.get_context("spawn").Queue()
    procs = [
        mp.get_context("spawn").Process(target=_publish_one, args=(settings.storage_uri, q)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    versions = sorted(q.get(timeout=5) for _ in procs)
    assert list_versions(settings, "race") == versions
    for v in versions:  # each version holds only its own parts
        keys = resolve_dataset(settings, f"race@{v}").read_table().column("key").to_pylist()
        assert sorted(keys) == [f"{v}-{i}" for i in range(3)]
    assert resolve_dataset(settings, "race").version == versions[-1]


def test_synthetic_pairs_have_known_truth():
    pairs = make_pairs(50, 0.3, seed=3)
    assert sum(not p.matched for p in pairs) == 15
    for p in pairs:
        img = Image.open(io.BytesIO(p.image))
        assert img.size == (64, 64)
        assert p.colour in COLOURS and p.shape in SHAPES
        says_truth = p.colour in p.caption and p.shape in p.caption
        assert says_truth == p.matched
    assert [p.caption for p in make_pairs(5, seed=9)] == [p.caption for p in make_pairs(5, seed=9)]


def test_image_server_serves_routes_and_404(tmp_path):
    pairs = make_pairs(3)
    with ImageServer() as srv:
        urls = srv.add_pairs(pairs)
        srv.add("/teapot", Response(b"no", "text/plain", status=418, headers={"X-Robots-Tag": "noai"}))
        assert urllib.request.urlopen(urls[0]).read() == pairs[0].image
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url("/teapot"))
        assert e.value.code == 418 and e.value.headers["X-Robots-Tag"] == "noai"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url("/missing"))
        assert e.value.code == 404
        listing = write_url_list(str(tmp_path / "l.csv"), pairs, urls)
    rows = (tmp_path / "l.csv").read_text().splitlines()
    assert listing.endswith("l.csv") and rows[0].startswith("url,caption") and len(rows) == 4
    assert json.dumps(srv.hits)  # hits were counted per path
    assert srv.hits[f"/img/{pairs[0].key}.jpg"] == 1


def test_configuring_mlflow_does_not_leak_into_later_settings(tmp_path, monkeypatch):
    from vlforge import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(get_settings(storage=str(tmp_path / "a")))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert get_settings(storage=str(tmp_path / "b")).tracking_uri == f"sqlite:///{tmp_path}/b/mlflow.db"
