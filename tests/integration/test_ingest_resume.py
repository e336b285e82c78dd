"""Ingest killed with SIGKILL mid-run (the whole process tree) resumes without re-downloading finished shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from tasks.ingest import ingest
from tasks.ingest.accounting import ROW_COL, done_shards
from tasks.ingest.urllists import content_hash
from vlforge import raw, storage
from vlforge.demo.server import write_url_list
from vlforge.demo.synth import make_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = """
import sys
from tasks.ingest import ingest
from vlforge.settings import get_settings
ingest(sys.argv[1], "web", get_settings(), shard_size=4, processes=1, threads=2, timeout=60, retries=0,
       allow_private_networks=True)
"""


def _gated(image: bytes, gate: threading.Event):
    """Serves the image only once the gate opens: holds the run mid-shard until the test kills it."""

    def route(handler):
        gate.wait(timeout=60)
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "image/jpeg")
            handler.send_header("Content-Length", str(len(image)))
            handler.end_headers()
            handler.wfile.write(image)
        except OSError:
            pass

    return route


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_minus_nine_then_rerun_finishes_without_refetching_done_shards(settings, image_server, tmp_path):
    pairs = make_pairs(12, seed=5)
    urls = image_server.add_pairs(pairs)
    gate = threading.Event()
    slow_path = "/img/" + pairs[9].key + ".jpg"  # in the third shard (rows 8-11)
    image_server.add(slow_path, _gated(pairs[9].image, gate))
    path = write_url_list(str(tmp_path / "list.csv"), pairs, urls)
    batch = raw.batch_uri(settings, "web", content_hash(path)[:16])

    env = {**os.environ, "VLFORGE_STORAGE": settings.storage, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, path], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(lambda: image_server.hits.get(slow_path), 150, "the gated image to be requested")
        _wait_for(lambda: {0, 1} <= done_shards(batch), 60, "the first two shards")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole tree: driver, pool workers, logger
        proc.wait(timeout=30)
    assert not raw.is_complete(batch)
    done_before = done_shards(batch)
    first_two = ["/img/" + p.key + ".jpg" for p in pairs[:8]]
    assert all(image_server.hits.get(p) == 1 for p in first_two)

    gate.set()
    [result] = ingest(path, "web", settings, shard_size=4, processes=1, threads=2, timeout=5, retries=0,
                      allow_private_networks=True)  # fmt: skip
    assert not result.skipped and result.counts == {"success": 12}
    assert all(image_server.hits.get(p) == 1 for p in first_two)  # finished shards were not fetched again
    assert {0, 1} <= done_before
    rows = [r for f in raw.shard_files(batch) for r in pq.read_table(f, columns=[ROW_COL]).to_pylist()]
    assert sorted(r[ROW_COL] for r in rows) == list(range(12))  # every row exactly once
    assert not storage.exists(storage.join(batch, "_tmp"))
