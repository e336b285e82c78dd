"""The compose topology, natively on loopback: Prefect server, MLflow server (SQLite backend, artifacts on S3),
moto's S3 server standing in for MinIO, a Ray head. The pipeline flow (ingest, curate, pretrain, LoRA fine-tune)
runs once against all of them, with its storage on s3:// and its URL list on S3, under distinctive ("canary")
S3 credentials and a tracking URI that carries a password. Two tests read that one run:

- ``test_pipeline_runs_on_the_native_stack``: the results are read back from each service;
- ``test_no_secret_reaches_console_logs_mlflow_prefect_or_the_bucket``: the console (the run's and that of the
  CLI's ``lineage``), every file the run wrote (its logs, Prefect's database, Ray's session), every MLflow param,
  tag, metric name, artifact and model version, every Prefect artifact and every object in the bucket are
  searched for the canaries. None may hold one.
"""

from __future__ import annotations

import glob
import json
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.servers import BIN, background, base_env, free_port, log_tail, prefect_server
from vlforge.demo.server import ImageServer, write_url_list
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "vlforge-stack"
KEY_ID = "AKIACANARY" + secrets.token_hex(5).upper()
SECRET = "canary-s3cr3t-" + secrets.token_hex(8)
PASSWORD = "canary-pw-" + secrets.token_hex(8)
CANARIES = (KEY_ID, SECRET, PASSWORD)
S3_ENV = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
URL_LIST = f"s3://{BUCKET}/incoming/list.csv"

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


@dataclass
class StackRun:
    """The services (still up while the tests read them) and what the one pipeline run left."""

    endpoint: str  # moto's S3
    tracking_uri: str  # the MLflow server, without the password
    run_env: dict[str, str]  # the pipeline's environment (canary credentials, tracking URI with the password)
    prefect_api: str
    work: Path  # everything the run and the Prefect server wrote: logs, PREFECT_HOME, Prefect's database
    ray_temp_dir: Path  # the Ray head's sessions (the driver's and the workers' logs)
    image_hits: int
    console: str
    result: dict


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)


def s3_keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    # Short (socket paths are limited to ~107 chars) and private to this module; removed afterwards.
    work = Path(tempfile.mkdtemp(prefix="vlf-stack-", dir="/tmp"))
    try:
        yield from _run_pipeline_on_the_stack(tmp, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_pipeline_on_the_stack(tmp: Path, work: Path):
    s3_port, mlflow_port, ray_port = free_port(), free_port(), free_port()
    # moto on another loopback address than the images: the guard in the download workers (127.0.0.1/32
    # allowed) must not stand in the way of their writes to the storage root.
    endpoint = f"http://127.0.0.3:{s3_port}"
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    secret_tracking_uri = f"http://canary:{PASSWORD}@127.0.0.1:{mlflow_port}"  # basic auth in the URI
    # Ray 2.5x+ clusters authenticate with a token: every node and driver of this stack gets the same one.
    ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = base_env(**S3_ENV, **ray_auth, VLFORGE_S3_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
    ray_temp_dir = work / "ray"

    moto_cmd = [str(BIN / "moto_server"), "-H", "127.0.0.3", "-p", str(s3_port)]
    mlflow_cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--serve-artifacts",
    ]  # fmt: skip
    ray_cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ray_port), "--num-cpus", "4",
        "--include-dashboard=false", "--dashboard-port", str(free_port()), "--disable-usage-stats",
        "--temp-dir", str(ray_temp_dir), "--block",
    ]  # fmt: skip
    with (
        background("moto", moto_cmd, env, tmp / "moto.log") as moto,
        prefect_server(work / "prefect") as prefect_api,
        background("mlflow server", mlflow_cmd, env, tmp / "mlflow.log") as mlflow_server,
        # A Ray node drains for up to 30 s on SIGTERM; nothing here needs draining.
        background("ray head", ray_cmd, env, tmp / "ray.log", grace=3) as ray_head,
    ):
        moto.wait_http(f"{endpoint}/moto-api/", 60)
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        mlflow_server.wait_http(f"{tracking_uri}/health", 120)
        wait_for_ray(ray_port, env, ray_head)

        # A URL list on S3 pointing at images served on loopback.
        pairs = make_pairs(48, 0.0, seed=11, prefix="stack")
        with ImageServer() as images:
            local_list = write_url_list(str(tmp / "list.csv"), pairs, images.add_pairs(pairs))
            s3.upload_file(local_list, BUCKET, "incoming/list.csv")
            params = {
                "refresh": {
                    "source": "stack",
                    "location": f"s3://{BUCKET}/incoming/",
                    "dataset": "stack",
                    "scorer": None,
                    "top_fraction": None,
                    "shard_size": 16,
                    "allowed_networks": ["127.0.0.1/32"],
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
                PREFECT_HOME=str(work / "run-home"),
                VLFORGE_STORAGE=f"s3://{BUCKET}/vlforge",
                MLFLOW_TRACKING_URI=secret_tracking_uri,
                VLFORGE_RAY_ADDRESS=f"127.0.0.1:{ray_port}",
            )
            with background(
                "pipeline",
                [sys.executable, "-c", PIPELINE_SCRIPT, json.dumps(params)],
                run_env,
                work / "pipeline.log",
                cwd=work,
            ) as run:
                try:
                    run.proc.wait(480)
                except subprocess.TimeoutExpired:
                    run.fail("pipeline did not finish within 480 s")
                if run.proc.returncode != 0:
                    run.fail(f"pipeline exited with {run.proc.returncode}")
        console = log_tail(run.log, 10_000_000)
        result = json.loads(console.split("PIPELINE-RESULT ", 1)[1].splitlines()[0])
        yield StackRun(
            endpoint,
            tracking_uri,
            run_env,
            prefect_api,
            work,
            ray_temp_dir,
            len(images.hits),
            console,
            result,
        )


def test_pipeline_runs_on_the_native_stack(stack, monkeypatch):
    from mlflow import MlflowClient

    from vlforge import tracking
    from vlforge.datasets import resolve_dataset
    from vlforge.settings import get_settings

    assert stack.image_hits, "the pipeline never fetched an image"
    # The work ran on this cluster (its session has worker logs), not on a Ray the driver started.
    assert glob.glob(f"{stack.ray_temp_dir}/session_*/logs/worker-*"), "no Ray worker ran on the stack's head"

    # The dataset version lives on S3 (manifest written last), readable through vlforge.
    for key, value in {**S3_ENV, "VLFORGE_S3_ENDPOINT_URL": stack.endpoint}.items():
        monkeypatch.setenv(key, value)
    settings = get_settings(storage=f"s3://{BUCKET}/vlforge")
    dv = resolve_dataset(settings, "stack")
    assert stack.result["refresh"]["dataset_version"] == dv.ref
    s3 = s3_client(stack.endpoint)
    keys = s3_keys(s3, f"vlforge/datasets/stack/{dv.version}/")
    assert f"vlforge/datasets/stack/{dv.version}/manifest.json" in keys
    assert any(k.endswith(".parquet") and "/data/" in k for k in keys)
    assert dv.manifest["counts"]["kept"] > 0

    # Both models are registered in the MLflow server, their artifacts proxied to S3.
    client = MlflowClient(tracking_uri=stack.tracking_uri, registry_uri=stack.tracking_uri)
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
    assert_pipeline_completed(stack.prefect_api)


def test_no_secret_reaches_console_logs_mlflow_prefect_or_the_bucket(stack, tmp_path):
    # The console of the CLI too: it reads the registry (through the tracking URI) and prints the lineage.
    console = stack.console + run_command(
        [sys.executable, "-m", "flows.cli", "lineage", "models:/vlforge-clip@champion"],
        stack.run_env,
        stack.work,
    )
    s3 = s3_client(stack.endpoint)
    found = leaks("console output", console)
    file_found, n_files = files_leaks(stack.work)
    bucket_found, keys = bucket_leaks(s3)
    mlflow_found, runs = mlflow_leaks(stack.tracking_uri, tmp_path / "artifacts")
    prefect_found, n_artifacts = prefect_artifact_leaks(stack.work / "prefect")
    found += file_found + bucket_found + mlflow_found + prefect_found
    assert not found, "a secret leaked:\n" + "\n".join(found)
    # What was searched is what the run wrote: the stages ran against these services.
    assert f"url list {URL_LIST}" in console and n_files > 0
    assert list(stack.ray_temp_dir.rglob("session_*/logs/*")), (
        "Ray's session logs were not where they were searched"
    )
    assert any(k.startswith("vlforge/raw/stack/") and k.endswith("_SUCCESS") for k in keys)
    assert any(k.startswith("vlforge/datasets/stack/") and k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("mlartifacts/") for k in keys)
    stages = ("ingest", "datasets", "pretrain", "finetune")
    assert all(runs.get(f"vlforge-{stage}", 0) >= 1 for stage in stages), runs
    assert n_artifacts > 0


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


def leaks(where: str, data: bytes | str) -> list[str]:
    """Where a canary occurs in ``data``, with the text around it (the canary itself masked)."""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    found = []
    for canary in map(str.encode, CANARIES):
        at = raw.find(canary)
        if at >= 0:
            context = raw[max(0, at - 120) : at + len(canary) + 60].replace(canary, b"<CANARY>")
            found.append(f"{where}: ...{context.decode('utf-8', 'replace')}...")
    return found


def run_command(cmd: list[str], env: dict, cwd: Path, timeout: float = 420) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{cmd[-3:]} exited with {done.returncode}:\n{output[-6000:]}"
    return output


def files_leaks(root: Path) -> tuple[list[str], int]:
    found, n = [], 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            n += 1
            found += leaks(str(path.relative_to(root)), path.read_bytes())
    return found, n


def bucket_leaks(s3) -> tuple[list[str], list[str]]:
    keys = s3_keys(s3)
    found = []
    for key in keys:
        found += leaks(f"s3://{BUCKET}/{key}", key)
        found += leaks(f"s3://{BUCKET}/{key}", s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    return found, keys


def mlflow_leaks(tracking_uri: str, download_to: Path) -> tuple[list[str], dict[str, int]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found, runs_per_experiment = [], {}
    for exp in client.search_experiments():
        found += leaks(f"experiment {exp.name}", f"{exp.name} {exp.artifact_location} {exp.tags}")
        runs = client.search_runs([exp.experiment_id])
        runs_per_experiment[exp.name] = len(runs)
        for run in runs:
            where = f"run {run.info.run_id} ({exp.name})"
            found += leaks(f"{where} params", repr(run.data.params))
            found += leaks(f"{where} tags", repr(run.data.tags))
            found += leaks(f"{where} metric names", repr(sorted(run.data.metrics)))
            found += leaks(f"{where} inputs", repr(run.inputs))
            found += leaks(f"{where} artifact uri", run.info.artifact_uri)
            local = download_to / run.info.run_id
            local.mkdir(parents=True)
            client.download_artifacts(run.info.run_id, "", str(local))
            found += [f"{where} artifact {leak}" for leak in files_leaks(local)[0]]
    for model in client.search_registered_models():
        found += leaks(f"model {model.name}", repr(model))
        for version in client.search_model_versions(f"name = '{model.name}'"):
            found += leaks(f"model {model.name} v{version.version}", repr(version))
    return found, runs_per_experiment


def prefect_artifact_leaks(prefect_dir: Path) -> tuple[list[str], int]:
    found, n = [], 0
    for db in prefect_dir.rglob("*.db"):
        with sqlite3.connect(db) as con:
            for key, data, description in con.execute("SELECT key, data, description FROM artifact"):
                n += 1
                found += leaks(f"prefect artifact {key}", f"{data} {description}")
    return found, n
