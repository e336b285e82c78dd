"""``vlforge serve --train-on-publish DATASET`` against a real Prefect server: publishing a version of DATASET (the
``vlforge.dataset.published`` event curate emits after the manifest) starts exactly one run of the train
deployment, on that version; a version of another dataset starts none."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tests.integration.servers import background, base_env, prefect_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = "trig"
TRIGGER_NAME = f"train on each new version of {DATASET}"

# Publishes a one-row version of each dataset named in argv and emits the event as curate does.
PUBLISH = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    from prefect.events.worker import EventsWorker
    from tasks.events import emit_dataset_published
    from vlforge.datasets import VersionWriter
    from vlforge.settings import get_settings

    refs = []
    for name in sys.argv[1:]:
        writer = VersionWriter(get_settings(), name)
        writer.write_table("data", pa.table({"key": ["0"], "caption": ["a red circle"]}))
        dv = writer.publish({"counts": {"kept": 1}})
        assert emit_dataset_published(dv) is not None, "the event was not emitted"
        refs.append(dv.ref)
    EventsWorker.drain_all()
    print("PUBLISHED " + json.dumps(refs))
    """
)


def _client_runs(api: str, flow_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _automations(api: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_automations()


def _wait(what: str, check, server, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if server.proc.poll() is not None:
            server.fail(f"exited with {server.proc.returncode} while waiting for {what}")
        time.sleep(1)
    server.fail(f"no {what} within {timeout:.0f} s")


def test_a_published_version_starts_one_train_run_on_that_version(tmp_path):
    with prefect_server(tmp_path / "prefect") as api:
        env = base_env(PREFECT_API_URL=api, VLFORGE_STORAGE=str(tmp_path / "storage"))
        serve_cmd = [sys.executable, "-m", "flows.cli", "serve", "--train-on-publish", DATASET]
        with background("vlforge serve", serve_cmd, env, tmp_path / "serve.log", cwd=tmp_path) as serve:
            automation = _wait(
                "train-on-publish automation",
                lambda: [a for a in _automations(api) if a.name == TRIGGER_NAME],
                serve,
                180,
            )[0]
            published = subprocess.run(
                [sys.executable, "-c", PUBLISH, DATASET, "other"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert published.returncode == 0, published.stderr[-4000:]
            ref, other_ref = json.loads(published.stdout.split("PUBLISHED ", 1)[1])
            assert ref.startswith(f"{DATASET}@")

            runs = _wait("train flow run", lambda: _client_runs(api, "train"), serve, 90)
            # The runner of `vlforge serve` picks it up (it may then fail: the version holds one caption).
            started = _wait(
                "train run leaving SCHEDULED",
                lambda: [r for r in _client_runs(api, "train") if r.state.type.value not in ("SCHEDULED",)],
                serve,
                90,
            )
            time.sleep(5)  # a duplicate trigger would have fired by now
            runs = _client_runs(api, "train")

    assert len(runs) == 1, [(r.name, r.parameters) for r in runs]
    run = runs[0]
    assert run.parameters == {"params": {"dataset": ref}}, run.parameters
    assert other_ref not in json.dumps(run.parameters)
    assert run.deployment_id == automation.actions[0].deployment_id
    assert started[0].id == run.id
