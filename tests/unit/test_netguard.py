"""The network policy (--allow-network), the guard on every urllib hop, and credentials kept out of MLflow."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tasks.ingest.accounting import reason
from vlforge import netguard
from vlforge.errors import VlforgeError
from vlforge.netguard import NetworkPolicy
from vlforge.tracking import redact, safe_params


def test_allowed_networks_act_as_public_and_nothing_else_does():
    policy = NetworkPolicy.of(False, ["127.0.0.1/32", "10.1.2.0/24", "fd00::/8"])
    assert policy.permits("127.0.0.1") and policy.permits("10.1.2.200") and policy.permits("fd00::5")
    assert policy.permits("93.184.216.34")  # public
    for address in (
        "127.0.0.2",
        "10.1.3.1",
        "169.254.169.254",
        "192.168.0.1",
        "::1",
        "224.0.0.1",
        "240.0.0.1",
    ):
        assert not policy.permits(address), address
    assert policy.permits("::ffff:127.0.0.1") and not policy.permits("::ffff:127.0.0.2")  # IPv4-mapped
    assert NetworkPolicy.of(True).permits("169.254.169.254") and not NetworkPolicy.of(True).active
    assert netguard.host_refusal("127.0.0.1", policy) is None
    assert netguard.host_refusal("127.0.0.2", policy).reason == netguard.PRIVATE_NETWORK


def test_a_bad_network_is_one_clear_error():
    with pytest.raises(VlforgeError, match=r"--allow-network 'intranet' is not a network.*CIDR"):
        NetworkPolicy.of(False, ["intranet"])


def test_redirects_to_other_schemes_or_refused_hosts_are_refused_with_the_hop():
    policy = NetworkPolicy.of(False, ["127.0.0.1/32"])
    assert netguard.redirect_refusal("http://127.0.0.1:8000/b.jpg", policy) is None
    refusal = netguard.redirect_refusal("http://169.254.169.254/latest/meta-data/", policy)
    assert refusal.reason == netguard.PRIVATE_NETWORK
    assert "redirect to http://169.254.169.254/latest/meta-data/ refused" in refusal.detail
    assert netguard.redirect_refusal("ftp://127.0.0.1/x", policy).reason == netguard.BAD_SCHEME


def test_guarded_urllib_refuses_the_connection_itself_and_only_inside_the_guard():
    # Nothing listens on port 9 of 127.0.0.2: unguarded, urllib connects and is refused by the kernel;
    # guarded, the connection is never attempted and the error names the hop and the reason.
    url = "http://127.0.0.2:9/x.jpg"
    policy = NetworkPolicy.of(False, ["127.0.0.1/32"])
    with netguard.guarded(policy), pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(url, timeout=2)
    message = str(refused.value)
    assert "connection to 127.0.0.2:9 refused: non-public address 127.0.0.2" in message
    assert reason("failed_to_download", message) == "private_network"  # as img2dataset stores it
    with pytest.raises(urllib.error.URLError) as unguarded:
        urllib.request.urlopen(url, timeout=2)
    assert "refused by vlforge" not in str(unguarded.value)


@pytest.mark.parametrize(
    ("value", "secret"),
    [
        ("s3://AKIACANARY:canary-s3cr3t@minio:9000/bucket/prefix", "canary-s3cr3t"),
        ("s3://AKIACANARY:canary/s3cr3t@minio/bucket", "canary/s3cr3t"),  # a raw "/" in the key
        ("postgresql://mlflow:canary-pw@db:5432/mlflow", "canary-pw"),
        ("http://admin:canary-pw@127.0.0.1:5000", "canary-pw"),
        ("https://ghp_canarytoken@github.com/org/repo", "ghp_canarytoken"),
        ("https://bucket.s3.amazonaws.com/x.jpg?X-Amz-Signature=canarysig&X-Amz-Date=1", "canarysig"),
    ],
)
def test_safe_params_redacts_credentials_inside_values(value, secret):
    safe = safe_params({"uri": value, "note": f"copied from {value} yesterday"})
    assert secret not in safe["uri"] and secret not in safe["note"]
    assert "***" in safe["uri"]


def test_safe_params_keeps_plain_values_and_drops_secret_keys(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-env-s3cr3t")
    params = {
        "dataset": "web@20260101T000000",
        "storage": "s3://bucket/datasets/web@v1",
        "aws_secret_access_key": "x",
        "db_password": "y",
        "echo": "key is canary-env-s3cr3t",
    }
    assert safe_params(params) == {
        "dataset": "web@20260101T000000",
        "storage": "s3://bucket/datasets/web@v1",
        "echo": "key is ***",
    }
    assert redact("plain text, no secret") == "plain text, no secret"


def test_cli_takes_repeated_allow_network_and_rejects_a_bad_one_in_one_line(settings, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    path = tmp_path / "list.csv"
    path.write_text("url,caption\nhttp://10.1.2.3/a.jpg,a\n")
    args = ["ingest", str(path), "--source", "web", "--allow-network", "127.0.0.1/32", "--allow-network"]
    result = CliRunner().invoke(app, [*args, "10.0.0.0/33"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--allow-network '10.0.0.0/33' is not a network" in " ".join(result.output.split())


def test_refresh_flow_parameters_take_allowed_networks_and_reject_a_bad_one():
    from pydantic import ValidationError

    from flows.params import RefreshParams

    params = RefreshParams(location="l", ingest={"allowed_networks": ["10.1.2.0/24"]})
    assert params.ingest.allowed_networks == ["10.1.2.0/24"]
    with pytest.raises(ValidationError, match="'mirror' is not a network"):
        RefreshParams(location="l", allowed_networks=["mirror"])


def test_a_registry_error_does_not_show_the_tracking_uri_password(monkeypatch):
    import socket

    from vlforge.errors import ModelNotFoundError
    from vlforge.registry import registered_version
    from vlforge.settings import Settings

    with socket.socket() as s:  # a port nothing listens on: MLflow's request fails and names its URL
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv(
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false"
    )  # configure() sets it: restored after
    settings = Settings(storage="/tmp/unused", mlflow_tracking_uri=f"http://admin:canary-pw@127.0.0.1:{port}")
    with pytest.raises(ModelNotFoundError) as error:
        registered_version("models:/vlforge-clip@champion", settings)
    assert "canary-pw" not in str(error.value) and f"http://***@127.0.0.1:{port}" in str(error.value)
    assert error.value.__suppress_context__  # the original error (with the URL) is not shown below it
