"""`vlforge ingest` and `vlforge curate` as a user runs them: stage lines, progress and summaries on the console,
no library output there, and all of it in the command's log file (whose path the command prints)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from models.clip import build_clip
from vlforge.demo.server import write_url_list
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A line written by a Ray, MLflow or Prefect logger, Ray worker output reaching the driver, a Python warning,
# a traceback or a tqdm bar.
LIBRARY_LINE = re.compile(
    r"\b(ray|mlflow|prefect|py\.warnings|streaming_executor|core_worker)[\w.]*[\s:|]"
    r"|\(\w[^)]* pid=\d+\)|Warning|WARNING|ERROR|Traceback|it/s\]"
)


@pytest.fixture
def settings(settings):
    """A storage root without an MLflow database (conftest's holds a migrated one): the first command creates
    it, and MLflow's lines about that are the library output the log must hold and the console must not."""
    os.remove(os.path.join(settings.storage_uri, "mlflow.db"))
    return settings


def _env(settings) -> dict[str, str]:
    return dict(os.environ, VLFORGE_STORAGE=settings.storage_uri, COLUMNS="160")


def _cli(args: list[str], settings) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _log_of(output: str) -> str:
    paths = re.findall(r"^log: (\S+)$", output, re.M)
    assert len(paths) == 1, output
    with open(paths[0]) as f:
        return f.read()


def _clean(output: str) -> None:
    noisy = [line for line in output.splitlines() if LIBRARY_LINE.search(line)]
    assert not noisy, output


def test_ingest_and_curate_show_stages_and_summaries_and_log_the_libraries(settings, image_server, tmp_path):
    pairs = make_pairs(12, 0.0, seed=5)
    url_list = write_url_list(str(tmp_path / "list.csv"), pairs, image_server.add_pairs(pairs))
    scorer = build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "scorer"))
    fast = ["--shard-size", "4", "--processes", "1", "--threads", "4", "--allow-private-networks"]

    rc, out = _cli(["ingest", url_list, "--source", "web", *fast], settings)
    assert rc == 0, out
    _clean(out)
    assert re.search(r"^> ingest .*list\.csv into source web$", out, re.M), out
    assert re.search(r"^  downloading list\.csv: 12/12 rows in ", out, re.M), out
    assert re.search(r"^ok ingest .* \(\d", out, re.M) and "(12 rows, 100.0% success" in out, out
    assert "━" not in out  # no live display in a pipe
    log = _log_of(out)
    assert "Downloading starting now" in log  # img2dataset's own output, from its processes
    assert "mlflow" in log

    rc, out = _cli(
        ["curate", "--source", "web", "--dataset", "d", "--scorer", scorer, "--min-score", "-1"], settings
    )
    assert rc == 0, out
    _clean(out)
    assert re.search(r"^> curate source web into dataset d$", out, re.M), out
    assert re.search(r"^published d@\S+ at ", out, re.M) and "kept: 12" in out, out
    log = _log_of(out)
    assert "Execution plan of Dataset" in log  # Ray Data's driver log


def test_progress_is_live_on_a_terminal(settings, image_server, tmp_path):
    pairs = make_pairs(12, 0.0, seed=6)
    url_list = write_url_list(str(tmp_path / "tty.csv"), pairs, image_server.add_pairs(pairs))
    args = ["ingest", url_list, "--source", "tty", "--shard-size", "3", "--processes", "1", "--threads", "2"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args, "--allow-private-networks"],
        env=_env(settings),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    # The live line: description, bar, count/total and unit, redrawn while img2dataset works.
    live = re.findall(r"downloading tty\.csv\s+━+\s*\d+/12 rows", plain)
    assert live, plain[-3000:]
    assert "downloading tty.csv: 12/12 rows in " in plain


def test_stage_lines_reach_the_prefect_flow_run_logs(settings):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import FlowRunContext

    from vlforge import console

    @flow(name="staged")
    def staged():
        with console.stage("score the pool"):
            console.warn_user("3 rows have no caption")
        return FlowRunContext.get().flow_run.id

    run_id = staged()
    messages, deadline = [], time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline and not any(m.startswith("ok score") for m in messages):
            time.sleep(0.5)  # Prefect ships run logs to its API in batches
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            messages = [log.message for log in logs]
    assert "> score the pool" in messages, messages
    assert "warning: 3 rows have no caption" in messages, messages
    assert any(m.startswith("ok score the pool (") for m in messages), messages
