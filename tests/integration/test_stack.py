"""The compose topology, natively on loopback and started as compose starts it: PostgreSQL (databases made by
``infra/postgres/init-databases.sh``) behind the Prefect server and the MLflow server (``infra/mlflow/entrypoint.sh``,
artifacts proxied to S3), SeaweedFS as the S3 store (``infra/seaweedfs/entrypoint.sh``, bucket made by
``create-buckets.sh``), a Ray head. Two pipeline flows (ingest, curate, pretrain, LoRA fine-tune) run at once
against all of them (the second without the LoRA fine-tune: two Ray Train runs at once on 2 cores already show
the registry's concurrency, a third and fourth only cost time), each on its own source and dataset but the same
registered models, bucket and databases,
with their storage on s3:// and their URL list on S3, under distinctive ("canary") S3 credentials, a Postgres
password and a tracking URI that carries a password. Three tests read those runs:

- ``test_pipeline_runs_on_the_native_stack``: the results are read back from each service, and the events
  the stages emitted from the Prefect server;
- ``test_two_concurrent_pipelines_lose_no_run_metric_or_version``: both complete; the registry holds a version
  per run of each model (two pretrained, one fine-tuned), each from its own MLflow run with all its metrics;
- ``test_no_secret_reaches_console_logs_mlflow_prefect_or_the_bucket``: the consoles (the runs' and that of
  the CLI's ``lineage``), every file the runs wrote (their logs, Postgres's data folder, the Prefect server's
  log, Ray's session), every MLflow param, tag, metric name, artifact and model version, every Prefect artifact
  and every object in the bucket are searched for the canaries. None may hold one.

The same commands run the stack by hand: docs/operations.md ("The stack without Docker").
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.servers import (
    BIN,
    ROOT,
    background,
    base_env,
    free_port,
    log_tail,
    postgres_server,
    prefect_server,
    seaweedfs_server,
    terminate_all,
)
from vlforge.demo.server import ImageServer, write_url_list
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "vlforge-stack"
KEY_ID = "AKIACANARY" + secrets.token_hex(5).upper()
SECRET = "canary-s3cr3t-" + secrets.token_hex(8)
PASSWORD = "canary-pw-" + secrets.token_hex(8)
PG_PASSWORD = "canary-pg-" + secrets.token_hex(8)
PG_USER = "vlforge"
CANARIES = (KEY_ID, SECRET, PASSWORD, PG_PASSWORD)
S3_ENV = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
URL_LIST = f"s3://{BUCKET}/incoming/list.csv"
DATASETS = ("stack", "stack-b")  # one pipeline run each, at once
FINETUNED = DATASETS[:1]  # the pipelines that also fine-tune with LoRA

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
    """The services (still up while the tests read them) and what the two pipeline runs left."""

    endpoint: str  # SeaweedFS's S3
    tracking_uri: str  # the MLflow server, without the password
    run_env: dict[str, str]  # the pipelines' environment (canary credentials, tracking URI with the password)
    prefect_api: str
    work: Path  # everything the runs and the servers wrote: logs, PREFECT_HOME, Postgres's data folder
    ray_temp_dir: Path  # the Ray head's sessions (the drivers' and the workers' logs)
    image_hits: int
    console: str  # both runs' consoles
    results: dict[str, dict]  # dataset -> the pipeline's result
    pg: object  # servers.Postgres: the MLflow and Prefect databases

    @property
    def result(self) -> dict:
        return self.results[DATASETS[0]]


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    )


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


def _pipeline_params(dataset: str) -> dict:
    return {
        "refresh": {
            "source": dataset,
            "location": f"s3://{BUCKET}/incoming/",
            "dataset": dataset,
            "scorer": None,
            "top_fraction": None,
            "shard_size": 16,
            "allowed_networks": ["127.0.0.1/32"],
        },
        "train": {
            "dataset": dataset,
            "epochs": 1,
            "batch_size": 16,
            "num_workers": 1,
            "use_gpu": False,
            "finetune_epochs": 1,
            "finetune": dataset in FINETUNED,
        },
    }


def _run_pipeline_on_the_stack(tmp: Path, work: Path):
    mlflow_port, ray_port = free_port(), free_port()
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    secret_tracking_uri = f"http://canary:{PASSWORD}@127.0.0.1:{mlflow_port}"  # basic auth in the URI
    # Ray 2.5x+ clusters authenticate with a token: every node and driver of this stack gets the same one.
    ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray_temp_dir = work / "ray"
    ray_cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ray_port), "--num-cpus", "4",
        "--include-dashboard=false", "--dashboard-port", str(free_port()), "--disable-usage-stats",
        "--temp-dir", str(ray_temp_dir), "--block",
    ]  # fmt: skip
    # The S3 endpoint is chosen before SeaweedFS is up, so the services start at once rather than one by one.
    s3_port = free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = base_env(**S3_ENV, **ray_auth, VLFORGE_S3_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
    mlflow_cmd = ["sh", str(ROOT / "infra/mlflow/entrypoint.sh")]
    with (
        # A Ray node drains for up to 30 s on SIGTERM; nothing here needs draining.
        background("ray head", ray_cmd, env, tmp / "ray.log", grace=3) as ray_head,
        # Postgres's data folder is under `work`: the secrets search reads it.
        postgres_server(work / "pg", PG_USER, PG_PASSWORD) as pg,
        # compose's MLflow service (its entrypoint and environment, on loopback): it needs Postgres up, and S3 only
        # once an artifact is written.
        background(
            "mlflow server", mlflow_cmd, _mlflow_env(env, pg, mlflow_port), tmp / "mlflow.log"
        ) as mlflow_server,
        # SeaweedFS's data and its credentials file stay outside: the bucket is searched through S3.
        seaweedfs_server(
            tmp / "seaweedfs", tmp / "seaweedfs-config", base_env(**S3_ENV), BUCKET, s3_port=s3_port
        ) as sw,
        prefect_server(work / "prefect", database_url=pg.url("prefect", "postgresql+asyncpg")) as prefect_api,
    ):
        assert sw.endpoint == endpoint
        s3 = s3_client(sw.endpoint)
        mlflow_server.wait_http(f"{tracking_uri}/health", 120)
        wait_for_ray(ray_port, env, ray_head)
        run_env = dict(
            env,
            PREFECT_API_URL=prefect_api,
            PREFECT_HOME=str(work / "run-home"),
            VLFORGE_STORAGE=f"s3://{BUCKET}/vlforge",
            MLFLOW_TRACKING_URI=secret_tracking_uri,
            VLFORGE_RAY_ADDRESS=f"127.0.0.1:{ray_port}",
        )
        # A URL list on S3 pointing at images served on loopback.
        pairs = make_pairs(48, 0.0, seed=11, prefix="stack")
        with ImageServer() as images:
            local_list = write_url_list(str(tmp / "list.csv"), pairs, images.add_pairs(pairs))
            s3.upload_file(local_list, BUCKET, "incoming/list.csv")
            consoles, results = _run_pipelines_at_once(run_env, work)
        yield StackRun(
            sw.endpoint,
            tracking_uri,
            run_env,
            prefect_api,
            work,
            ray_temp_dir,
            len(images.hits),
            "\n".join(consoles.values()),
            results,
            pg,
        )
        terminate_all()  # the services shut down side by side, not one after another on the way out


def _mlflow_env(env: dict, pg, port: int) -> dict:
    return dict(
        env,
        PATH=str(BIN) + os.pathsep + env.get("PATH", ""),
        POSTGRES_USER=PG_USER,
        POSTGRES_PASSWORD=PG_PASSWORD,
        POSTGRES_HOST=pg.host,
        POSTGRES_PORT=str(pg.port),
        MLFLOW_DB="mlflow",
        S3_BUCKET=BUCKET,
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="2",
    )


def _run_pipelines_at_once(run_env: dict, work: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """One pipeline process per dataset, started together; each must finish (480 s) and exit 0."""
    import contextlib

    consoles, results = {}, {}
    with contextlib.ExitStack() as stack:
        runs = {
            dataset: stack.enter_context(
                background(
                    f"pipeline {dataset}",
                    [sys.executable, "-c", PIPELINE_SCRIPT, json.dumps(_pipeline_params(dataset))],
                    run_env,
                    work / f"pipeline-{dataset}.log",
                    cwd=work,
                )
            )
            for dataset in DATASETS
        }
        for dataset, run in runs.items():
            try:
                run.proc.wait(480)
            except subprocess.TimeoutExpired:
                run.fail("pipeline did not finish within 480 s")
            if run.proc.returncode != 0:
                run.fail(f"pipeline exited with {run.proc.returncode}")
            consoles[dataset] = log_tail(run.log, 10_000_000)
            results[dataset] = json.loads(consoles[dataset].split("PIPELINE-RESULT ", 1)[1].splitlines()[0])
    return consoles, results


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
    for name, datasets in ((tracking.PRETRAINED_MODEL, DATASETS), (tracking.LORA_MODEL, FINETUNED)):
        versions = client.search_model_versions(f"name = '{name}'")
        assert versions, f"{name} is not registered"
        runs = [client.get_run(v.run_id) for v in versions]
        assert {r.data.tags.get(tracking.TAG_DATASET) for r in runs} == set(datasets)
        assert all(tracking.TAG_FLOW_RUN in r.data.tags for r in runs)
    assert s3_keys(s3, "mlartifacts/"), "no MLflow artifact reached S3"

    # Ray Train wrote its checkpoints to the storage root on S3: pretrain's model and LoRA's adapter,
    # each with the optimizer state.
    ckpts = [k for k in s3_keys(s3, "vlforge/ray_results/") if "/checkpoint_" in k]
    assert any(k.endswith("/train_state.pt") for k in ckpts), ckpts[:10]
    assert any(k.endswith("/model/model.safetensors") for k in ckpts), ckpts[:10]
    assert any("/adapter/" in k for k in ckpts), ckpts[:10]

    # The registry lives in Postgres (the MLflow server's backend store).
    rows = pg_rows(stack.pg, "mlflow", "SELECT name, version FROM model_versions")
    assert {name for name, _ in rows} >= {tracking.PRETRAINED_MODEL, tracking.LORA_MODEL}, rows

    # The flow runs are recorded by the Prefect server, in Postgres too.
    assert_pipelines_completed(stack.prefect_api)
    assert pg_rows(stack.pg, "prefect", "SELECT count(*) FROM flow_run WHERE name IS NOT NULL")[0][0] >= 2

    # Where the stages meet: curate announced each version, registration each model version (and champions).
    # The server persists events in batches (every few seconds): wait for the last registrations'.
    events = read_events(
        stack.prefect_api, "vlforge.", until=lambda evs: len(evs) >= 2 * len(DATASETS) + len(FINETUNED) + 1
    )
    published = {
        e["resource"]["vlforge.dataset.ref"]: e for e in events if e["event"] == "vlforge.dataset.published"
    }
    for result in stack.results.values():
        ref = result["refresh"]["dataset_version"]
        assert ref in published, (ref, sorted(published))
        version = resolve_dataset(settings, ref)
        assert published[ref]["payload"]["content_hash"] == version.manifest["content_hash"]
        assert published[ref]["payload"]["counts"] == version.manifest["counts"]
    registered = [e for e in events if e["event"] == "vlforge.model.registered"]
    assert {e["resource"]["prefect.resource.id"] for e in registered} == {
        f"vlforge.model.{v.name}/{v.version}"
        for name in (tracking.PRETRAINED_MODEL, tracking.LORA_MODEL)
        for v in client.search_model_versions(f"name = '{name}'")
    }
    assert all(any(r["prefect.resource.role"] == "training-data" for r in e["related"]) for e in registered)
    champions = {(v.name, v.version) for v in _champions(client)}
    promoted = {
        (e["resource"]["vlforge.model.name"], e["resource"]["vlforge.model.version"])
        for e in events
        if e["event"] == "vlforge.model.promoted"
    }
    assert champions <= promoted, (champions, promoted)


def test_two_concurrent_pipelines_lose_no_run_metric_or_version(stack):
    from mlflow import MlflowClient

    from tasks.promotion import VS_CHAMPION
    from vlforge import tracking

    assert set(stack.results) == set(DATASETS)
    client = MlflowClient(tracking_uri=stack.tracking_uri, registry_uri=stack.tracking_uri)
    versions = client.search_model_versions(f"name = '{tracking.PRETRAINED_MODEL}'")
    # One version per run, numbered without a gap or a repeat, each from its own MLflow run.
    assert sorted(int(v.version) for v in versions) == [1, 2], [v.version for v in versions]
    runs = [client.get_run(v.run_id) for v in versions]
    assert len({r.info.run_id for r in runs}) == 2
    assert sorted(r.data.tags.get(tracking.TAG_DATASET) for r in runs) == sorted(DATASETS)
    # Every training metric one run logged, the other logged too (none lost to the other's writes). The
    # comparison with the champion only the later registration has, so those are left out.
    metric_names = [{m for m in r.data.metrics if not m.startswith(VS_CHAMPION)} for r in runs]
    assert metric_names[0] and metric_names[0] == metric_names[1], metric_names
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    # The fine-tune, written while the other pipeline was still training: its one version, all its metrics.
    (lora,) = client.search_model_versions(f"name = '{tracking.LORA_MODEL}'")
    lora_run = client.get_run(lora.run_id)
    assert lora_run.info.status == "FINISHED" and lora_run.data.tags.get(tracking.TAG_DATASET) == FINETUNED[0]
    assert {"loss", "eval_mean_recall"} <= set(lora_run.data.metrics), sorted(lora_run.data.metrics)
    # Both pipelines' results name what the registry holds.
    registered = {
        (name, v.version)
        for name in (tracking.PRETRAINED_MODEL, tracking.LORA_MODEL)
        for v in client.search_model_versions(f"name = '{name}'")
    }
    assert len(registered) == len(DATASETS) + len(FINETUNED)
    assert {
        r["train"][stage]["model_uri"]
        for r in stack.results.values()
        for stage in r["train"]
        if stage != "dataset"
    } == {f"models:/{n}/{v}" for n, v in registered}


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
    prefect_found, n_artifacts = prefect_artifact_leaks(stack.prefect_api)
    found += file_found + bucket_found + mlflow_found + prefect_found
    assert not found, "a secret leaked:\n" + "\n".join(found)
    # What was searched is what the run wrote: the stages ran against these services.
    assert f"url list {URL_LIST}" in console and n_files > 0
    assert list(stack.ray_temp_dir.rglob("session_*/logs/*")), (
        "Ray's session logs were not where they were searched"
    )
    assert list((stack.work / "pg").rglob("base/*/*")), (
        "Postgres's data files were not where they were searched"
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


def _prefect_client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


def assert_pipelines_completed(api_url: str) -> None:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _prefect_client(api_url) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])))
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * len(DATASETS)


def read_events(api_url: str, prefix: str, until=lambda events: True, timeout: float = 30) -> list[dict]:
    """The events whose name starts with ``prefix`` (the last day's, as the Prefect server stores them), once
    ``until(events)`` holds or ``timeout`` seconds have passed."""
    import time

    import httpx

    body = {"filter": {"event": {"prefix": [prefix]}}, "limit": 50}  # the most one page holds
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{api_url}/events/filter", json=body, timeout=30)
        response.raise_for_status()
        events = response.json()["events"]
        if until(events) or time.monotonic() > deadline:
            return events
        time.sleep(1)


def _champions(client):
    from mlflow.exceptions import MlflowException

    from vlforge import tracking

    out = []
    for name in (tracking.PRETRAINED_MODEL, tracking.LORA_MODEL):
        try:
            out.append(client.get_model_version_by_alias(name, "champion"))
        except MlflowException:
            pass
    return out


def pg_rows(pg, database: str, sql: str) -> list[tuple]:
    import psycopg2

    con = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=database)
    try:
        with con.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        con.close()


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


def prefect_artifact_leaks(api_url: str) -> tuple[list[str], int]:
    found = []
    with _prefect_client(api_url) as client:
        artifacts = client.read_artifacts()
    for artifact in artifacts:
        found += leaks(f"prefect artifact {artifact.key}", f"{artifact.data} {artifact.description}")
    return found, len(artifacts)
