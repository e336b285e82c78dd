"""Ingest from and to s3:// through s3fs, against moto's S3 server on loopback."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tasks.ingest import ingest
from tasks.ingest.accounting import ROW_COL
from vlforge import raw, storage
from vlforge.demo.server import write_url_list
from vlforge.demo.synth import make_pairs
from vlforge.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "VLFORGE_S3_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="vlforge-test")
    yield endpoint
    server.stop()


def test_list_on_s3_ingests_into_an_s3_storage_root(s3_endpoint, image_server, tmp_path, monkeypatch):
    monkeypatch.setenv("VLFORGE_STORAGE", "s3://vlforge-test/store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    settings = get_settings()
    pairs = make_pairs(5, seed=7)
    local = write_url_list(str(tmp_path / "list.csv"), pairs, image_server.add_pairs(pairs))
    with open(local, "rb") as f:
        storage.write_bytes_atomic("s3://vlforge-test/lists/list.csv", f.read())

    [result] = ingest("s3://vlforge-test/lists/", "web", settings, shard_size=4, processes=1, threads=2,
                      timeout=2, retries=0, allow_private_networks=True)  # fmt: skip
    assert result.uri.startswith("s3://vlforge-test/store/raw/web/")
    assert result.counts == {"success": 5}
    assert raw.list_raw_batches(settings, "web") == [result.batch_id]
    rows = []
    for shard in raw.shard_files(result.uri):
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=[ROW_COL, "status", "jpg"]).to_pylist()
    assert sorted(r[ROW_COL] for r in rows) == list(range(5)) and all(r["jpg"] for r in rows)

    [again] = ingest("s3://vlforge-test/lists/list.csv", "web", settings, allow_private_networks=True)
    assert again.skipped and again.counts == {"success": 5}


def test_command_log_is_written_locally_and_uploaded_to_s3_storage(s3_endpoint, tmp_path, monkeypatch):
    import os

    from vlforge import console

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLFORGE_STORAGE", "s3://vlforge-test/store")
    settings = get_settings()
    with console.session("unit", settings) as uri:
        os.write(2, b"a library line\n")
    assert uri.startswith("s3://vlforge-test/store/logs/") and uri.endswith("-unit.log")
    assert b"a library line" in storage.read_bytes(uri)
    [local] = os.listdir(tmp_path / ".vlforge-logs")
    assert uri.endswith("/" + local)
    with pytest.raises(RuntimeError), console.session("failing", settings) as failed_uri:
        os.write(2, b"what went wrong\n")
        raise RuntimeError("boom")
    assert b"what went wrong" in storage.read_bytes(failed_uri)  # uploaded after an error too
