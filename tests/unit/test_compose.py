"""docker-compose.yml, the Dockerfiles, infra/ scripts and .env.example, checked without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")
# ${VAR}, ${VAR:-default}, ${VAR:?message}; "$$" escapes a literal dollar for the container's shell.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def as_list(command) -> list[str]:
    return command.split() if isinstance(command, str) else list(command or [])


def test_has_the_services_of_the_topology(services):
    expected = {
        "postgres",
        "seaweedfs",
        "seaweedfs-init",
        "prefect-server",
        "mlflow",
        "ray-head",
        "ray-worker",
        "vlforge",
    }
    assert expected <= set(services)


def test_every_service_has_a_healthcheck(services):
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name


def test_depends_on_names_existing_services_with_conditions(services):
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)


def test_every_variable_is_listed_in_env_example():
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    listed = set(env_example())
    assert used, "compose reads no variables?"
    assert used <= listed, f"missing from .env.example: {sorted(used - listed)}"


def test_env_example_commits_no_secret_values():
    for key, value in env_example().items():
        if any(word in key for word in SECRET_WORDS):
            assert value == "", f"{key} has a value in .env.example"


def test_environment_has_no_literal_secrets(services):
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for key, value in env.items():
            value = str(value)
            if any(word in key for word in SECRET_WORDS):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", value), f"{name}.{key} is not ${{VAR}}"
            # Credentials embedded in a URL must be interpolated too.
            for userinfo in re.findall(r"://([^/@\s]+)@", value):
                assert "${" in userinfo, f"{name}.{key} embeds credentials"


def test_required_secrets_fail_fast_when_unset():
    text = COMPOSE.read_text()
    for var in ("POSTGRES_PASSWORD", "S3_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
        assert re.search(r"\$\{" + var + r":\?", text), f"{var} must be required (${{{var}:?...}})"


def test_builds_and_referenced_files_exist(services):
    built = 0
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            built += 1
            context = ROOT / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for src in dockerfile_copy_sources(dockerfile):
                assert (context / src).exists(), f"{name}: {dockerfile.name} copies missing {src}"
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_file() or (ROOT / source).is_dir(), f"{name}: {source} missing"
    assert built >= 2


def dockerfile_copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


def test_published_ports(services):
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            host, _, container = str(port).rpartition(":")
            published[(name, int(container))] = host
    for name, port in [("prefect-server", 4200), ("mlflow", 5000), ("seaweedfs", 8333), ("ray-head", 8265)]:
        assert (name, port) in published, f"{name} does not publish {port}"
    hosts = list(published.values())
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"


def test_postgres_creates_prefect_and_mlflow_databases(services):
    mounts = services["postgres"]["volumes"]
    init = [m for m in mounts if "/docker-entrypoint-initdb.d/" in m]
    assert init, "no init script mounted"
    script = (ROOT / init[0].split(":")[0]).read_text()
    env = services["postgres"]["environment"]
    assert {env["PREFECT_DB"], env["MLFLOW_DB"]} == {"prefect", "mlflow"}
    assert "CREATE DATABASE" in script and "PREFECT_DB" in script and "MLFLOW_DB" in script


def test_seaweedfs_bucket_is_created_before_its_users(services):
    init = services["seaweedfs-init"]
    assert init["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    script = (ROOT / init["volumes"][0].split(":")[0]).read_text()
    assert "s3.bucket.create -name" in script
    for user in ("mlflow", "vlforge", "ray-head"):
        assert services[user]["depends_on"]["seaweedfs-init"]["condition"] == "service_completed_successfully"


def test_seaweedfs_is_the_apache_licensed_image_with_its_s3_identity_from_env(services):
    svc = services["seaweedfs"]
    assert svc["image"].startswith("chrislusf/seaweedfs:")
    assert svc["environment"]["AWS_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_ACCESS_KEY:?")
    entrypoint = (ROOT / "infra/seaweedfs/entrypoint.sh").read_text()
    assert "weed server" in entrypoint and "-s3.config=" in entrypoint and "umask 077" in entrypoint
    assert "-s3.port=8333" in svc["command"]


def test_prefect_server_runs_on_postgres(services):
    svc = services["prefect-server"]
    assert as_list(svc["command"])[:3] == ["prefect", "server", "start"]
    url = svc["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect")
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mlflow_server_uses_postgres_and_seaweedfs(services):
    svc = services["mlflow"]
    entrypoint = (ROOT / "infra/mlflow/entrypoint.sh").read_text()
    assert "mlflow server" in entrypoint
    assert (
        re.search(r"--backend-store-uri \"\$backend\"", entrypoint)
        and 'backend="postgresql+psycopg2://' in entrypoint
    )
    assert '--artifacts-destination "s3://${S3_BUCKET}/mlartifacts"' in entrypoint
    assert svc["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    dockerfile = (ROOT / svc["build"]["dockerfile"]).read_text()
    assert "psycopg2" in dockerfile and "boto3" in dockerfile


def test_vlforge_serves_against_the_services(services):
    svc = services["vlforge"]
    command = as_list(svc["command"])
    assert command[:2] == ["vlforge", "serve"]
    env = svc["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["VLFORGE_STORAGE"].startswith("s3://")
    assert env["VLFORGE_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert env["VLFORGE_RAY_ADDRESS"] == "ray-head:6379"
    for dep in ("prefect-server", "mlflow", "ray-head"):
        assert svc["depends_on"][dep]["condition"] == "service_healthy"


def test_serve_flags_in_compose_exist_on_the_cli(services):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    flags = [a.split("=")[0] for a in as_list(services["vlforge"]["command"]) if a.startswith("--")]
    assert flags
    for flag in flags:
        assert flag in result.output, f"vlforge serve has no {flag}"


def test_ray_head_and_workers(services):
    head = as_list(services["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head and "--port=6379" in head
    worker = as_list(services["ray-worker"]["command"])
    assert "--address=ray-head:6379" in worker and "--block" in worker
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # The same image as the driver: Ray needs identical Python/Ray/code on every node.
    for name in ("ray-head", "ray-worker", "vlforge", "prefect-server"):
        assert services[name]["image"] == services["vlforge"]["image"]


def test_ray_cluster_authenticates_with_one_token(services):
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "vlforge"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_gpu_worker_is_optional_and_reserves_gpus(services):
    gpu = services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"], "the GPU worker must not start by default"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert any(a.startswith("--num-gpus=") for a in gpu["command"])


def test_dockerfile_installs_cpu_torch_before_the_project():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM")][0]] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    torch_at = text.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    assert torch_at < text.index("pip install .")


def test_dockerignore_keeps_secrets_and_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git", ".vlforge", "mlruns"} <= ignored


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
@pytest.mark.parametrize(
    "script",
    sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "infra").glob("*/*.sh")
        if p.parent.name in ("postgres", "seaweedfs", "mlflow", "ray", "vlforge")
    ),
)
def test_infra_scripts_parse(script):
    assert subprocess.run(["sh", "-n", str(ROOT / script)], capture_output=True).returncode == 0
