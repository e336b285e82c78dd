"""img2dataset's download processes are forked from one warm server (tasks/ingest/workers.py), and each still gets
the environment and the standard streams of the list it works for, as a spawned process would."""

from __future__ import annotations

import os
import sys


def _report(_):
    os.write(1, f"worker {os.getpid()} says A={os.environ.get('VLF_TEST_A')}\n".encode())
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:  # the server this worker was forked from
        server = f.read()
    return (
        os.getppid(),
        os.environ.get("VLF_TEST_A"),
        os.environ.get("VLF_TEST_B"),
        "img2dataset" in sys.modules and b"tasks.ingest.workers" in server,  # from a server that preloaded it
    )


def _pool_reports(distributor, out) -> list[tuple]:
    import importlib

    i2d_main = importlib.import_module("img2dataset.main")  # the module (the package's "main" is a function)

    # What img2dataset.download does: start its logger process first, then its multiprocessing distributor's
    # get_context("spawn").Pool(n, maxtasksperchild=5).
    logger = i2d_main.LoggerProcess(str(out), False, "", {})
    logger.start()
    try:
        with distributor.get_context("spawn").Pool(2, maxtasksperchild=5) as pool:
            return pool.map(_report, range(4))
    finally:
        logger.join()


def _with_stdout_to(path, fn):
    """``fn()`` with this process's fd 1 on ``path`` (as a vlforge command puts it on its log file)."""
    saved = os.dup(1)
    with open(path, "wb") as target:
        os.dup2(target.fileno(), 1)
        try:
            return fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def test_forked_workers_take_the_environment_and_streams_of_each_list_and_come_warm(monkeypatch, tmp_path):
    import multiprocessing

    import img2dataset.distributor as distributor

    from tasks.ingest.workers import forked_processes

    monkeypatch.setenv("VLF_TEST_A", "first")
    monkeypatch.setenv("VLF_TEST_B", "only the first")
    with forked_processes():
        first = _with_stdout_to(tmp_path / "first.log", lambda: _pool_reports(distributor, tmp_path / "a"))
    # A later list, once the server runs: a changed variable and a removed one reach its workers as they are now.
    monkeypatch.setenv("VLF_TEST_A", "second")
    monkeypatch.delenv("VLF_TEST_B")
    with forked_processes():
        second = _with_stdout_to(tmp_path / "second.log", lambda: _pool_reports(distributor, tmp_path / "b"))

    assert {r[1:] for r in first} == {("first", "only the first", True)}, first
    assert {r[1:] for r in second} == {("second", None, True)}, second
    # Forked from the server (img2dataset already imported there), not started by this process.
    assert {r[0] for r in first + second} != {os.getpid()}
    # Each list's workers wrote to the caller's fd 1 of that time, not to the one the server started with.
    assert (tmp_path / "first.log").read_text().count("says A=first") == 4
    assert (tmp_path / "second.log").read_text().count("says A=second") == 4
    assert distributor.get_context is multiprocessing.get_context  # img2dataset as it was, afterwards


def _child_reports(out: str) -> None:
    import importlib
    import json

    from tasks.ingest.workers import forked_processes

    distributor = importlib.import_module("img2dataset.distributor")
    with forked_processes():
        reports = _pool_reports(distributor, os.path.join(out, "logs"))
    with open(os.path.join(out, "child.json"), "w") as f:
        json.dump({"pid": os.getpid(), "A": os.environ.get("VLF_TEST_A"), "reports": reports}, f)


def test_a_list_ingested_off_the_main_thread_runs_in_a_warm_child_with_the_callers_environment(
    monkeypatch, tmp_path
):
    import json
    import threading

    from tasks.ingest.workers import WarmChild

    monkeypatch.setenv("VLF_TEST_A", "off the main thread")
    exitcodes = []

    def ingest_in_a_thread():  # as a Prefect task thread runs tasks.ingest.run.run_img2dataset
        child = WarmChild(_child_reports, (str(tmp_path),), "vlforge-img2dataset")
        child.start()
        child.join()
        exitcodes.append(child.exitcode)

    thread = threading.Thread(target=ingest_in_a_thread)
    thread.start()
    thread.join()

    assert exitcodes == [0]
    child = json.loads((tmp_path / "child.json").read_text())
    assert child["pid"] != os.getpid() and child["A"] == "off the main thread"
    # Its logger and workers are forks of the child itself (warm: img2dataset preloaded by the server it came
    # from), with the caller's environment.
    assert {r[0] for r in child["reports"]} == {child["pid"]}, child
    assert {tuple(r[1:]) for r in child["reports"]} == {("off the main thread", None, True)}, child
