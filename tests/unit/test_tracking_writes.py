"""Every MLflow write goes through ``vlforge/tracking.py`` (runs, params, metrics, artifacts, dataset inputs,
models, tags, aliases), the training workers' included: an AST scan of our packages, as test_layers.py scans
their imports. Reads (``get_run``, ``search_runs``...) may stay where they are."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from vlforge import tracking

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vlforge", "models", "tasks", "flows", "bench")
TRACKING = ROOT / "vlforge" / "tracking.py"

# MLflow's writing calls, on the client (MlflowClient) and in the fluent API (mlflow.*, mlflow.pyfunc.*).
WRITES = {
    "create_experiment", "set_experiment", "set_experiment_tag", "delete_experiment",
    "create_run", "start_run", "end_run", "set_terminated", "update_run", "delete_run",
    "log_param", "log_params", "log_metric", "log_metrics", "log_batch", "log_dict", "log_text",
    "log_figure", "log_image", "log_table", "log_artifact", "log_artifacts", "log_input", "log_inputs",
    "log_outputs", "log_model", "save_model", "set_tag", "set_tags", "delete_tag",
    "create_registered_model", "create_model_version", "register_model", "update_model_version",
    "delete_model_version", "set_registered_model_tag", "set_model_version_tag", "delete_model_version_tag",
    "set_registered_model_alias", "delete_registered_model_alias", "set_tracking_uri", "set_registry_uri",
    "autolog", "set_logged_model_tags", "finalize_logged_model", "initialize_logged_model",
}  # fmt: skip


def mlflow_writes(source: str) -> list[str]:
    """``line: call`` for each MLflow write in ``source``: a writing method called on anything but the
    ``tracking`` module, or a writing function imported from mlflow."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            found += [
                f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name in WRITES
            ]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        receiver = node.func.value
        if node.func.attr in WRITES and not (isinstance(receiver, ast.Name) and receiver.id == "tracking"):
            found.append(f"{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_the_scan_finds_each_kind_of_write():
    code = (
        "import mlflow\nfrom mlflow import log_metric\nclient = configure(settings)\n"
        "client.set_tag(run_id, 'k', 'v')\nmlflow.pyfunc.log_model(name='m')\n"
        "mlflow.set_registered_model_alias('m', 'champion', '1')\ntracking.log_dict(s, r, {}, 'x.json')\n"
        "client.get_run(run_id)\n"
    )
    assert mlflow_writes(code) == [
        "2: from mlflow import log_metric",
        "4: client.set_tag",
        "5: mlflow.pyfunc.log_model",
        "6: mlflow.set_registered_model_alias",
    ]


def test_every_mlflow_write_goes_through_the_tracking_module():
    offenders = {
        str(path.relative_to(ROOT)): writes
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != TRACKING and (writes := mlflow_writes(path.read_text()))
    }
    assert offenders == {}, "call vlforge.tracking instead: " + repr(offenders)
    assert mlflow_writes(TRACKING.read_text()), "the scan no longer sees the tracking module's own writes"


def test_the_tracking_writes_land_in_the_run(settings, tmp_path):
    """The write functions the stages use, against a real (SQLite) MLflow: tags, params, metrics, artifacts, a
    dataset input, the end status; a block that raises leaves its stage run FAILED."""
    import mlflow

    from tests.helpers import publish_synthetic_dataset
    from vlforge import tracking

    dv, _ = publish_synthetic_dataset(settings, "d", n=4)
    with tracking.stage_run(settings, "curate", tags={"vlforge.x": "1"}) as run_id:
        tracking.set_run_tags(settings, run_id, {"vlforge.y": 2})
        tracking.log_to_run(
            settings, run_id, params={"a": 1, "secret_key": "s3cr3t-value"}, metrics={"m": 0.5}
        )
        tracking.log_dict(settings, run_id, {"k": "v"}, "summary.json")
        tracking.log_files(settings, run_id, {"notes.md": "# notes", "bytes.bin": b"\x00\x01"}, "extra")
        tracking.log_dataset_input(settings.tracking_uri, run_id, dv, context="output")  # a worker's URI
    run = tracking.configure(settings).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {run.data.tags["vlforge.x"], run.data.tags["vlforge.y"], run.data.tags[tracking.TAG_STAGE]} == {
        "1",
        "2",
        "curate",
    }
    assert run.data.params == {"a": "1"} and run.data.metrics == {"m": 0.5}  # the secret-named param dropped
    names = {a.path for a in tracking.configure(settings).list_artifacts(run_id)}
    assert {"summary.json", "extra"} <= names
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/extra/notes.md") == "# notes"
    (inp,) = run.inputs.dataset_inputs
    assert (
        inp.dataset.name == dv.ref and {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "output"
    )

    with pytest.raises(RuntimeError), tracking.stage_run(settings, "curate") as failed:
        raise RuntimeError("boom")
    assert tracking.configure(settings).get_run(failed).info.status == "FAILED"
    tracking.end_run(settings, failed, "KILLED", metrics={"last": 1.0})
    assert tracking.configure(settings).get_run(failed).data.metrics == {"last": 1.0}


def test_a_run_continued_in_this_process_leaves_the_environment_as_it_was(settings, monkeypatch):
    # A one-worker training continues its run in the driver's process: pointing MLflow at the run's database
    # must not export MLFLOW_TRACKING_URI, or the next command of the process (the next test) would take the
    # old database for the user's choice.
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    run_id = tracking.start_stage_run(settings, "pretrain")
    tracking.continue_run_in_worker(settings.tracking_uri, run_id, {"lr": 0.1})
    try:
        assert mlflow.active_run().info.run_id == run_id
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    finally:
        tracking.leave_worker_run()
