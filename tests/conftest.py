"""Shared fixtures: an isolated storage root + MLflow on SQLite per test, offline hubs, one local Ray."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Offline and quiet for every test process (and the subprocesses they start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    """Keep Prefect's and Ray's state out of the user's home; never talk to a configured server."""
    home = tmp_path_factory.mktemp("prefect-home")
    old = {
        k: os.environ.get(k)
        for k in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")
    }
    os.environ["PREFECT_HOME"] = str(home)
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "VLFORGE_RAY_ADDRESS"):
        os.environ.pop(k, None)
    yield
    for k, v in old.items():
        if v is not None:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _mlflow_process_state():
    """MLflow keeps an active run and experiment per process: never let one test's leak into the next."""
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow
        import mlflow.tracking.fluent as fluent

        while mlflow.active_run() is not None:
            mlflow.end_run()
        fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database, its schema made once: MLflow's migrations of a new database take seconds
    (~4 s on a 2-core box), which every test with a fresh storage root would pay again."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)  # runs the migrations
    return path


@pytest.fixture
def settings(tmp_path, monkeypatch, _empty_mlflow_db):
    """Settings with a fresh storage root under tmp_path, holding a fresh (empty, migrated) MLflow database."""
    from vlforge.settings import get_settings

    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(_empty_mlflow_db, store / "mlflow.db")
    monkeypatch.setenv("VLFORGE_STORAGE", str(store))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return get_settings()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    from vlforge.raycluster import init_ray
    from vlforge.settings import Settings

    init_ray(Settings(storage="/tmp/unused"))
    yield ray
    ray.shutdown()


@pytest.fixture
def image_server():
    from vlforge.demo.server import ImageServer

    with ImageServer() as srv:
        yield srv


def pytest_unconfigure(config):
    """Prefect stops its ephemeral API server from an atexit hook, after pytest has closed the captured
    streams; its last log line would then print a 'Logging error' traceback below the test summary."""
    import logging

    logging.raiseExceptions = False
