"""`vlforge serve` against a real Prefect server: deployments, the refresh schedule, and a train run created
through the API with custom parameters (what the UI's Run button does), tracked in MLflow with its flow run id."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers import publish_synthetic_dataset
from tests.integration.servers import BIN, background, base_env, free_port, log_tail, prefect_server

pytestmark = pytest.mark.integration

# A cron that will not fire while the test runs (04:17 on January 1st).
CRON = "17 4 1 1 *"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


def wait_for_deployment(client, name: str, serve, timeout: float):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve.proc.poll() is not None:
            serve.fail(f"exited with {serve.proc.returncode} before registering {name}")
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            time.sleep(1)
    serve.fail(f"deployment {name} not registered within {timeout:.0f} s")


def wait_for_flow_run(client, flow_run_id, serve, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.type.value in TERMINAL:
            return run
        time.sleep(2)
    serve.fail(f"flow run {flow_run_id} not finished within {timeout:.0f} s (state {run.state})")


@pytest.mark.slow
def test_serve_runs_train_from_the_api_and_schedules_refresh(settings, tmp_path):
    from mlflow import MlflowClient

    from flows import deployments, pipeline
    from vlforge import tracking

    dv, _ = publish_synthetic_dataset(settings, name="served", n=48, seed=3)
    incoming = tmp_path / "incoming"
    with prefect_server(tmp_path / "prefect") as api_url:
        env = base_env(
            PREFECT_API_URL=api_url,
            PREFECT_HOME=str(tmp_path / "serve-home"),
            PREFECT_RUNNER_POLL_FREQUENCY="2",
            VLFORGE_STORAGE=settings.storage_uri,
        )
        cmd = [str(BIN / "vlforge"), "serve", "--refresh-cron", CRON, "--refresh-location", str(incoming)]
        with (
            background("vlforge serve", cmd, env, tmp_path / "serve.log", cwd=tmp_path) as serve,
            prefect_client(api_url) as client,
        ):
            refresh = wait_for_deployment(
                client, f"{pipeline.refresh_dataset.name}/{deployments.REFRESH_DEPLOYMENT}", serve, 180
            )
            train = wait_for_deployment(
                client, f"{pipeline.train.name}/{deployments.TRAIN_DEPLOYMENT}", serve, 60
            )
            wait_for_deployment(
                client, f"{pipeline.pipeline.name}/{deployments.PIPELINE_DEPLOYMENT}", serve, 60
            )

            # The refresh deployment: active cron schedule, its location baked into the parameters.
            assert not refresh.paused
            [schedule] = refresh.schedules
            assert schedule.active and schedule.schedule.cron == CRON
            assert refresh.parameters["params"]["location"] == str(incoming)

            # The train form: a validated pydantic model with dataset and epochs.
            schema = train.parameter_openapi_schema
            assert "params" in schema["properties"]
            assert train.enforce_parameter_schema

            params = {
                "dataset": dv.ref,
                "epochs": 1,
                "batch_size": 16,
                "learning_rate": 1e-3,
                "num_workers": 1,
                "use_gpu": False,
                "finetune_epochs": 1,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            }
            flow_run = client.create_flow_run_from_deployment(train.id, parameters={"params": params})
            run = wait_for_flow_run(client, flow_run.id, serve, 420)
            assert run.state.type.value == "COMPLETED", f"train run ended {run.state}\n{log_tail(serve.log)}"
            assert run.parameters["params"]["epochs"] == 1

    mlflow = MlflowClient(tracking_uri=settings.tracking_uri)
    experiments = [mlflow.get_experiment_by_name(tracking.EXPERIMENTS[s]) for s in ("pretrain", "finetune")]
    runs = mlflow.search_runs(
        [e.experiment_id for e in experiments if e is not None],
        filter_string=f"tags.`{tracking.TAG_FLOW_RUN}` = '{flow_run.id}'",
    )
    stages = {mlflow.get_experiment(r.info.experiment_id).name for r in runs}
    assert stages == {tracking.EXPERIMENTS["pretrain"], tracking.EXPERIMENTS["finetune"]}


def test_serve_says_clearly_when_the_prefect_api_does_not_answer(tmp_path):
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = base_env(PREFECT_API_URL=api_url, VLFORGE_STORAGE=str(tmp_path / "store"))
    result = subprocess.run(
        [str(BIN / "vlforge"), "serve"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "does not answer" in result.stderr and api_url in result.stderr
    assert "Traceback" not in result.stderr
