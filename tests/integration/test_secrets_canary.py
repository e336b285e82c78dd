"""Secrets never leave the environment: ingest, curate and a short pretrain (the pipeline flow, so that Prefect
artifacts exist, then the CLI) run with storage on S3 (moto on loopback) under distinctive credentials and a tracking URI
that carries a password; then the console, every file the commands wrote (logs, Prefect's database, Ray's
session), every MLflow param, tag, metric name, artifact and model version, every Prefect artifact and every
object in the bucket are searched for the canaries. None may hold one."""

from __future__ import annotations

import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.integration.servers import BIN, background, base_env, free_port
from vlforge.demo.server import ImageServer, write_url_list
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "vlforge-canary"
KEY_ID = "AKIACANARY" + secrets.token_hex(5).upper()
SECRET = "canary-s3cr3t-" + secrets.token_hex(8)
PASSWORD = "canary-pw-" + secrets.token_hex(8)
CANARIES = (KEY_ID, SECRET, PASSWORD)

# One process runs the whole pipeline (one Prefect API, one Ray): refresh (ingest, curate) then a 1-epoch pretrain.
PIPELINE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from flows.params import PipelineParams
    from flows.pipeline import pipeline

    start = time.time()
    pipeline(PipelineParams.model_validate({
        "refresh": {"source": "canary", "location": sys.argv[1], "dataset": "canary", "scorer": None,
                    "top_fraction": None, "shard_size": 8, "allowed_networks": ["127.0.0.1/32"]},
        "train": {"dataset": "canary", "epochs": 1, "batch_size": 8, "use_gpu": False, "finetune": False},
    }))
    print(f"pipeline took {time.time() - start:.0f} s")
    """
)


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
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]  # fmt: skip
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


def prefect_artifact_leaks(prefect_home: Path) -> tuple[list[str], int]:
    found, n = [], 0
    for db in prefect_home.rglob("*.db"):
        with sqlite3.connect(db) as con:
            for key, data, description in con.execute("SELECT key, data, description FROM artifact"):
                n += 1
                found += leaks(f"prefect artifact {key}", f"{data} {description}")
    return found, n


@pytest.fixture
def short_tmp():
    path = Path(tempfile.mkdtemp(prefix="vlf-canary-", dir="/tmp"))  # Ray's socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_no_secret_reaches_console_logs_mlflow_prefect_or_the_bucket(tmp_path, short_tmp):
    import boto3

    s3_port, mlflow_port = free_port(), free_port()
    # moto on another loopback address than the images: the guard in the download workers (127.0.0.1/32
    # allowed) must not stand in the way of their writes to the storage root.
    endpoint = f"http://127.0.0.3:{s3_port}"
    creds = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    env = base_env(**creds, VLFORGE_S3_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    secret_tracking_uri = f"http://canary:{PASSWORD}@127.0.0.1:{mlflow_port}"  # basic auth in the URI
    work = short_tmp / "work"
    work.mkdir()
    run_env = dict(
        env,
        VLFORGE_STORAGE=f"s3://{BUCKET}/vlforge",
        MLFLOW_TRACKING_URI=secret_tracking_uri,
        PREFECT_HOME=str(work / "prefect-home"),
        RAY_TMPDIR=str(work / "ray"),
    )
    moto_cmd = [str(BIN / "moto_server"), "-H", "127.0.0.3", "-p", str(s3_port)]
    mlflow_cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--serve-artifacts",
    ]  # fmt: skip
    with (
        background("moto", moto_cmd, env, tmp_path / "moto.log") as moto,
        background("mlflow server", mlflow_cmd, env, tmp_path / "mlflow.log") as mlflow_server,
        ImageServer() as images,
    ):
        moto.wait_http(f"{endpoint}/moto-api/", 60)
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
        s3.create_bucket(Bucket=BUCKET)
        mlflow_server.wait_http(f"{tracking_uri}/health", 120)
        pairs = make_pairs(24, 0.0, seed=3, prefix="canary")
        s3.upload_file(
            write_url_list(str(tmp_path / "list.csv"), pairs, images.add_pairs(pairs)), BUCKET, "in/list.csv"
        )
        console = run_command([sys.executable, "-c", PIPELINE_SCRIPT, f"s3://{BUCKET}/in/"], run_env, work)
        # The console of the CLI too: it reads the registry (through the tracking URI) and prints the lineage.
        console += run_command(
            [sys.executable, "-m", "flows.cli", "lineage", "models:/vlforge-clip@champion"], run_env, work
        )

        found = leaks("console output", console)
        file_found, n_files = files_leaks(work)
        bucket_found, keys = bucket_leaks(s3)
        mlflow_found, runs = mlflow_leaks(tracking_uri, tmp_path / "artifacts")
        prefect_found, n_artifacts = prefect_artifact_leaks(work / "prefect-home")
    found += file_found + bucket_found + mlflow_found + prefect_found
    assert not found, "a secret leaked:\n" + "\n".join(found)
    # What was searched is what the commands wrote: the stages ran against these services.
    assert f"url list s3://{BUCKET}/in/list.csv" in console and n_files > 0
    assert list((work / "ray").rglob("session_*/logs/*")), (
        "Ray's session logs were not where they were searched"
    )
    assert any(k.startswith("vlforge/raw/canary/") and k.endswith("_SUCCESS") for k in keys)
    assert any(k.startswith("vlforge/datasets/canary/") and k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("mlartifacts/") for k in keys)
    assert all(runs.get(f"vlforge-{stage}", 0) >= 1 for stage in ("ingest", "datasets", "pretrain")), runs
    assert n_artifacts > 0
