"""Real servers on loopback for integration tests: start as subprocesses, wait (bounded), always stop.

Each process runs in its own session so that stopping it also stops its children (uvicorn workers, flow-run
subprocesses of ``vlforge serve``). Output goes to a log file whose tail is shown when something fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.name, self.log = name, log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def fail(self, why: str) -> None:
        raise AssertionError(f"{self.name}: {why}\n--- log tail ({self.log}) ---\n{log_tail(self.log)}")

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"exited with {self.proc.returncode} before answering {url}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code < 500:
                    return
            time.sleep(0.5)
        self.fail(f"{url} did not answer within {timeout:.0f} s")

    def stop(self, grace: float = 15) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:  # the leader is gone; children may survive it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log_file.close()


def base_env(**extra: str | None) -> dict[str, str]:
    """The test environment for a child process; ``None`` removes a variable."""
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "VLFORGE_RAY_ADDRESS"):
        env.pop(key, None)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", RAY_USAGE_STATS_ENABLED="0")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@contextlib.contextmanager
def prefect_server(tmp: Path, timeout: float = 120) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 with its SQLite database and PREFECT_HOME under ``tmp``."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    env = base_env(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = Server("prefect server", cmd, env, tmp / "prefect-server.log")
    try:
        api = f"http://127.0.0.1:{port}/api"
        server.wait_http(f"{api}/health", timeout)
        yield api
    finally:
        server.stop()


@contextlib.contextmanager
def background(
    name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None, grace: float = 15
):
    """Run ``cmd`` for the duration of the block; SIGTERM (then SIGKILL after ``grace`` s) on the way out."""
    server = Server(name, cmd, env, log, cwd)
    try:
        yield server
    finally:
        server.stop(grace)


MLFLOW_SERVE_STARTUP_S = 240


@contextlib.contextmanager
def mlflow_models_serve(model_uri: str, tmp: Path, env: dict[str, str]) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1 in the current environment (``--env-manager local``);
    yields the base URL once ``/ping`` answers. The server execs ``uvicorn`` from PATH, so this venv's bin comes
    first on it."""
    port = free_port()
    env = {**env, "PATH": str(BIN) + os.pathsep + env.get("PATH", "")}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["-p", str(port), "-h", "127.0.0.1"]
    with background("mlflow models serve", cmd, env, tmp / "serve.log", cwd=tmp, grace=20) as server:
        base = f"http://127.0.0.1:{port}"
        server.wait_http(base + "/ping", MLFLOW_SERVE_STARTUP_S)
        yield base


def post_json(url: str, payload: dict) -> dict:
    response = httpx.post(
        url, content=json.dumps(payload), headers={"Content-Type": "application/json"}, timeout=60
    )
    response.raise_for_status()
    return response.json()
