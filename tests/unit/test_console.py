"""The console module: inside a session people see stage lines, progress and warnings once; everything that
libraries write (fd 1/2, logging, warnings) goes to the command's log file, and the process is left as it was."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings

from vlforge import console


def test_session_shows_our_lines_and_records_the_libraries(settings, monkeypatch):
    user_out, user_err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", user_out)
    monkeypatch.setattr(sys, "stderr", user_err)
    with console.session("unit", settings) as path:
        with console.stage("fetch things"):
            os.write(1, b"raw output of a child process\n")
            os.write(2, b"raw error output of a child process\n")
            print("a library print")
            logging.getLogger("ray.data").warning("a Ray Data warning")
            logging.getLogger("mlflow.store").info("an MLflow info line")
            warnings.warn("a library UserWarning", UserWarning, stacklevel=1)
            with console.progress(3, "rows", "downloading", poll=lambda: (3, "all fine")) as bar:
                bar.advance(1)
            console.warn_user("12 rows have no caption")
            console.warn_user("12 rows have no caption")
            console.info("kept 3 of 3 rows")
        assert console.log_path() == path
    assert sys.stdout is user_out and console.log_path() is None
    shown = user_err.getvalue()
    lines = shown.splitlines()
    assert lines[0] == "> fetch things"
    assert lines[-1].startswith("ok fetch things (")
    assert "  downloading: 3/3 rows in " in shown and "all fine" in shown
    assert lines.count("  warning: 12 rows have no caption") == 1
    assert "  kept 3 of 3 rows" in lines
    for noise in ("raw output", "raw error", "library print", "Ray Data", "MLflow info", "UserWarning"):
        assert noise not in shown + user_out.getvalue(), noise
    assert path.startswith(os.path.join(settings.storage_uri, "logs")) and path.endswith("-unit.log")
    with open(path) as f:
        logged = f.read()
    for noise in (
        "raw output",
        "raw error",
        "library print",
        "Ray Data",
        "MLflow info",
        "a library UserWarning",
    ):
        assert noise in logged, noise
    assert "> fetch things" in logged and "warning: 12 rows have no caption" in logged


def test_failed_stage_says_so_and_outside_a_session_only_logs(settings, monkeypatch, caplog):
    user_err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", user_err)
    try:
        with console.session("unit", settings), console.stage("break"):
            raise ValueError("boom")
    except ValueError:
        pass
    assert user_err.getvalue().splitlines()[-1].startswith("failed: break (after ")
    caplog.set_level(logging.INFO, logger="vlforge")
    before = user_err.getvalue()
    with console.stage("quiet"), console.progress(None, "items", "counting") as bar:
        bar.advance(5)
    assert user_err.getvalue() == before  # no session: nothing printed
    assert "> quiet" in caplog.text and "counting: 5 items" in caplog.text


def test_verbose_session_shows_the_log_live_and_still_records_it(settings, capfd):
    with console.session("unit", settings, verbose=True) as path:
        os.write(2, b"library line from a child process\n")
        logging.getLogger("ray.data").warning("a Ray Data warning")
        with console.stage("step"):
            pass
    time.sleep(0.2)  # the tee thread copies what it read before the session ended
    shown = capfd.readouterr()
    assert "library line from a child process" in shown.err and "a Ray Data warning" in shown.err
    with open(path) as f:
        logged = f.read()
    assert "library line from a child process" in logged and "a Ray Data warning" in logged
    assert "> step" in logged
