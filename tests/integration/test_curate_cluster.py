"""Curation on a two-node Ray cluster (a head and a second raylet started with ``ray start`` on loopback),
writing to the S3 test server: both nodes write parts, and the version is complete."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

from tests.helpers import write_raw_batch
from tests.integration.servers import BIN, background, base_env, free_port
from tests.integration.test_ingest_s3 import s3_endpoint  # noqa: F401  (fixture)
from vlforge.datasets import resolve_dataset
from vlforge.demo.synth import make_pairs
from vlforge.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_for_nodes(address: str, env: dict, nodes: int, timeout: float = 120) -> None:
    code = (
        "import ray, sys, time\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        f"deadline = time.time() + {timeout}\n"
        f"while len([n for n in ray.nodes() if n['Alive']]) < {nodes}:\n"
        "    if time.time() > deadline: sys.exit('nodes did not join')\n"
        "    time.sleep(0.5)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=timeout + 60)


def test_curate_on_two_ray_nodes_writes_to_s3_from_both(s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(
        "VLFORGE_STORAGE", "s3://vlforge-test/cluster-store"
    )  # moto keeps buckets per process: not test_ingest_s3's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    settings = get_settings()
    pairs = make_pairs(48, 0.0, seed=21)
    pairs[30] = pairs[3]  # an exact duplicate across shards
    write_raw_batch(settings, "web", "b1", pairs, shard_size=6)  # 8 shards

    port = free_port()
    # Two nodes on two loopback addresses. Not 127.0.0.1: Ray rewrites that to the host's outward address.
    address = f"127.0.0.2:{port}"
    # Token auth is on by default for `ray start` in Ray 2.5x; these throwaway nodes run without it.
    env = base_env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = str(BIN / "ray")
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = [ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2", "--include-dashboard=false",
            f"--temp-dir={temp}", *common]  # fmt: skip
    worker = [ray, "start", f"--address={address}", "--node-ip-address=127.0.0.3", *common]
    try:
        proc = _curate_on_cluster(head, worker, address, env, tmp_path)
    finally:  # whatever `ray start --block` left behind
        subprocess.run(["pkill", "-9", "-f", temp], check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dv = resolve_dataset(settings, "multi")
    assert dv.uri.startswith("s3://vlforge-test/cluster-store/datasets/multi/")
    assert dv.manifest["compute"] == {**dv.manifest["compute"], "shards": 8, "nodes": 2}
    assert dv.manifest["counts"]["kept"] == 47 and dv.manifest["counts"]["duplicate"] == 1
    assert dv.read_table("data").num_rows == 47


def _curate_on_cluster(head, worker, address, env, tmp_path):
    with background("ray head", head, env, tmp_path / "head.log", grace=20):
        _wait_for_nodes(address, env, 1)
        with background("ray worker", worker, env, tmp_path / "worker.log", grace=20):
            _wait_for_nodes(address, env, 2)
            cli = {
                **env,
                "VLFORGE_RAY_ADDRESS": address,
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            }
            proc = subprocess.run(
                [str(BIN / "vlforge"), "curate", "--source", "web", "--dataset", "multi"],
                env=cli,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
            )
    return proc
