"""The CLI: user errors give one clear line and exit status 2, not a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.helpers import publish_synthetic_dataset

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = (
        "ingest", "curate", "pretrain", "finetune", "demo", "serve", "datasets", "export", "lineage", "promote",
    )  # fmt: skip
    for cmd in commands:
        assert cmd in result.output


def test_unknown_dataset_is_one_clear_line(settings):
    result = runner.invoke(app, ["pretrain", "--dataset", "nope"])
    assert result.exit_code == 2
    assert "unknown dataset 'nope'" in result.output
    assert "Traceback" not in result.output


def test_min_score_and_top_fraction_are_exclusive(settings):
    result = runner.invoke(
        app,
        [
            "curate",
            "--source",
            "s",
            "--dataset",
            "d",
            "--scorer",
            "x",
            "--min-score",
            "0.2",
            "--top-fraction",
            "0.3",
        ],
    )
    assert result.exit_code == 2
    assert "either --min-score or --top-fraction" in result.output


def test_datasets_lists_versions(settings):
    dv, _ = publish_synthetic_dataset(settings, "listed", n=3)
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0 and f"listed  (latest {dv.version})" in result.output
    result = runner.invoke(app, ["datasets", "listed"])
    assert result.exit_code == 0 and dv.ref in result.output


@pytest.mark.slow  # two fresh processes importing the stack
def test_bad_model_uri_fails_before_ray_or_prefect_start(settings, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    publish_synthetic_dataset(settings, "there", n=3)
    with socket.socket() as s:  # a Ray address nothing answers: connecting to it would be a different error
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, VLFORGE_STORAGE=settings.storage_uri, VLFORGE_RAY_ADDRESS=dead)
    for args in (
        ["finetune", "--dataset", "there", "--base", "models:/nope@champion"],
        ["pretrain", "--dataset", "there", "--init", str(tmp_path / "no-such-model")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, proc.stderr
        assert "nope" in proc.stderr or "no-such-model" in proc.stderr, proc.stderr
        assert "Ray cluster" not in proc.stderr and "Traceback" not in proc.stderr
        assert "log: " in proc.stderr
