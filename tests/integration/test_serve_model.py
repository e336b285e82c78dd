"""``mlflow models serve -m models:/vlforge-clip@champion --env-manager local`` answers REST requests with a
real image (base64) and caption: embeddings and a score."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tasks.evaluate import Evaluation
from tasks.register import register_model
from vlforge.demo.synth import make_pairs
from vlforge.tracking import PRETRAINED_MODEL, configure, ensure_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, payload: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def wait_for_ping(proc: subprocess.Popen, url: str, log_path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"no /ping answer in {STARTUP_TIMEOUT_S}s:\n{tail(log_path)}")


def tail(path: str, chars: int = 3000) -> str:
    with open(path) as f:
        return f.read()[-chars:]


@pytest.fixture
def champion(settings, tmp_path):
    """A tiny CLIP registered as models:/vlforge-clip@champion in the test's SQLite registry."""
    from models.clip import build_clip

    pairs = make_pairs(8, seed=21)
    model_dir = build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "final"))
    run_id = configure(settings).create_run(ensure_experiment(settings, "pretrain")).info.run_id
    reg = register_model(
        model_dir,
        name=PRETRAINED_MODEL,
        run_id=run_id,
        evaluation=Evaluation.of("synth@holdout", {"mean_recall": np.full(8, 0.1)}),
        settings=settings,
    )
    assert reg.alias == "champion"
    return pairs


def test_models_serve_answers_with_embeddings_and_score(settings, champion, tmp_path):
    pairs = champion
    port = free_port()
    bindir = os.path.dirname(sys.executable)  # the server execs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }
    cmd = [os.path.join(bindir, "mlflow"), "models", "serve", "-m", f"models:/{PRETRAINED_MODEL}@champion"]
    cmd += ["--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
    log_path = str(tmp_path / "serve.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_ping(proc, base + "/ping", log_path)
        both = post_json(
            base + "/invocations",
            {
                "dataframe_split": {
                    "columns": ["image", "text"],
                    "data": [[base64.b64encode(p.image).decode(), p.caption] for p in pairs[:2]],
                }
            },
        )["predictions"]
        assert len(both) == 2
        for row in both:
            assert set(row) == {"image_embedding", "text_embedding", "score"}
            img, txt = np.array(row["image_embedding"]), np.array(row["text_embedding"])
            assert np.linalg.norm(img) == pytest.approx(1.0, abs=1e-5)
            assert np.linalg.norm(txt) == pytest.approx(1.0, abs=1e-5)
            assert row["score"] == pytest.approx(float(img @ txt), abs=1e-5)
        texts_only = post_json(
            base + "/invocations",
            {"dataframe_split": {"columns": ["text"], "data": [[pairs[0].caption]]}},
        )["predictions"]
        assert set(texts_only[0]) == {"text_embedding"}
        assert texts_only[0]["text_embedding"] == pytest.approx(both[0]["text_embedding"], abs=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn it started, nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
