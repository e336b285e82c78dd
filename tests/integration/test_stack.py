"""The compose topology, natively on loopback: Prefect server, MLflow server (SQLite backend, artifacts on S3),
moto's S3 server standing in for MinIO, a Ray head; the pipeline flow runs against all of them with its storage
on s3:// and its URL list on S3, and the results are read back from each service."""

from __future__ import annotations

import glob
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tests.integration.servers import BIN, background, base_env, free_port, log_tail, prefect_server
from vlforge.demo.server import ImageServer, write_url_list
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "vlforge-stack"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "stack-test",
    "AWS_SECRET_ACCESS_KEY": "stack-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Runs in its own process (as `vlforge serve`'s flow runs do), so its Ray driver is the cluster's, not pytest's.
PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from flows.params import PipelineParams
    from flows.pipeline import pipeline

    result = pipeline(PipelineParams.model_validate(json.loads(sys.argv[1])))
    print("PIPELINE-RESULT " + json.dumps(result, default=str))
    """
)


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items() if "KEY" in k}
    )


def s3_keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture
def ray_temp_dir():
    # Short (socket paths are limited to ~107 chars) and private to this test; removed afterwards.
    path = tempfile.mkdtemp(prefix="vlf-stack-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_pipeline_runs_on_the_native_stack(tmp_path, monkeypatch, ray_temp_dir):
    from mlflow import MlflowClient

    from vlforge import tracking
    from vlforge.datasets import resolve_dataset
    from vlforge.settings import get_settings

    s3_port, mlflow_port, ray_port = free_port(), free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    # Ray 2.5x+ clusters authenticate with a token: every node and driver of this stack gets the same one.
    ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = base_env(**S3_ENV, **ray_auth, VLFORGE_S3_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)

    with (
        background(
            "moto",
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            env,
            tmp_path / "moto.log",
        ) as moto,
        prefect_server(tmp_path / "prefect") as prefect_api,
    ):
        moto.wait_http(f"{endpoint}/moto-api/", 60)
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)

        mlflow_cmd = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--serve-artifacts",
        ]  # fmt: skip
        ray_cmd = [
            str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ray_port), "--num-cpus", "4",
            "--include-dashboard=false", "--dashboard-port", str(free_port()), "--disable-usage-stats",
            "--temp-dir", ray_temp_dir, "--block",
        ]  # fmt: skip
        with (
            background("mlflow server", mlflow_cmd, env, tmp_path / "mlflow.log") as mlflow_server,
            # A Ray node drains for up to 30 s on SIGTERM; nothing here needs draining.
            background("ray head", ray_cmd, env, tmp_path / "ray.log", grace=3) as ray_head,
        ):
            mlflow_server.wait_http(f"{tracking_uri}/health", 120)
            wait_for_ray(ray_port, env, ray_head)

            # A URL list on S3 pointing at images served on loopback.
            pairs = make_pairs(48, 0.0, seed=11, prefix="stack")
            with ImageServer() as images:
                local_list = write_url_list(str(tmp_path / "list.csv"), pairs, images.add_pairs(pairs))
                s3.upload_file(local_list, BUCKET, "incoming/list.csv")
                params = {
                    "refresh": {
                        "source": "stack",
                        "location": f"s3://{BUCKET}/incoming/",
                        "dataset": "stack",
                        "scorer": None,
                        "top_fraction": None,
                        "allow_private_networks": True,
                    },
                    "train": {
                        "dataset": "stack",
                        "epochs": 1,
                        "batch_size": 16,
                        "num_workers": 1,
                        "use_gpu": False,
                        "finetune_epochs": 1,
                    },
                }
                run_env = dict(
                    env,
                    PREFECT_API_URL=prefect_api,
                    PREFECT_HOME=str(tmp_path / "run-home"),
                    VLFORGE_STORAGE=f"s3://{BUCKET}/vlforge",
                    MLFLOW_TRACKING_URI=tracking_uri,
                    VLFORGE_RAY_ADDRESS=f"127.0.0.1:{ray_port}",
                )
                with background(
                    "pipeline",
                    [sys.executable, "-c", PIPELINE_SCRIPT, json.dumps(params)],
                    run_env,
                    tmp_path / "pipeline.log",
                    cwd=tmp_path,
                ) as run:
                    try:
                        run.proc.wait(480)
                    except subprocess.TimeoutExpired:
                        run.fail("pipeline did not finish within 480 s")
                    if run.proc.returncode != 0:
                        run.fail(f"pipeline exited with {run.proc.returncode}")
            assert images.hits, "the pipeline never fetched an image"
            # The work ran on this cluster (its session has worker logs), not on a Ray the driver started.
            assert glob.glob(f"{ray_temp_dir}/session_*/logs/worker-*"), (
                "no Ray worker ran on the stack's head"
            )
            output = log_tail(run.log, 200_000)
            result = json.loads(output.split("PIPELINE-RESULT ", 1)[1].splitlines()[0])

            # The dataset version lives on S3 (manifest written last), readable through vlforge.
            for key, value in {**S3_ENV, "VLFORGE_S3_ENDPOINT_URL": endpoint}.items():
                monkeypatch.setenv(key, value)
            settings = get_settings(storage=f"s3://{BUCKET}/vlforge")
            dv = resolve_dataset(settings, "stack")
            assert result["refresh"]["dataset_version"] == dv.ref
            keys = s3_keys(s3, f"vlforge/datasets/stack/{dv.version}/")
            assert f"vlforge/datasets/stack/{dv.version}/manifest.json" in keys
            assert any(k.endswith(".parquet") and "/data/" in k for k in keys)
            assert dv.manifest["counts"]["kept"] > 0

            # Both models are registered in the MLflow server, their artifacts proxied to S3.
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            for name in (tracking.PRETRAINED_MODEL, tracking.LORA_MODEL):
                versions = client.search_model_versions(f"name = '{name}'")
                assert versions, f"{name} is not registered"
                run_info = client.get_run(versions[0].run_id)
                assert run_info.data.tags.get(tracking.TAG_DATASET) == "stack"
                assert tracking.TAG_FLOW_RUN in run_info.data.tags
            assert s3_keys(s3, "mlartifacts/"), "no MLflow artifact reached S3"

            # Ray Train wrote its checkpoints to the storage root on S3: pretrain's model and LoRA's adapter,
            # each with the optimizer state.
            ckpts = [k for k in s3_keys(s3, "vlforge/ray_results/") if "/checkpoint_" in k]
            assert any(k.endswith("/train_state.pt") for k in ckpts), ckpts[:10]
            assert any(k.endswith("/model/model.safetensors") for k in ckpts), ckpts[:10]
            assert any("/adapter/" in k for k in ckpts), ckpts[:10]

            # The flow run is recorded by the Prefect server.
            assert_pipeline_completed(prefect_api)


def wait_for_ray(port: int, env: dict, head, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            head.fail(f"exited with {head.proc.returncode}")
        check = subprocess.run(
            [str(BIN / "ray"), "health-check", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True
        )
        if check.returncode == 0:
            return
        time.sleep(1)
    head.fail(f"the Ray head on port {port} was not healthy within {timeout:.0f} s")


def assert_pipeline_completed(api_url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])))
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
