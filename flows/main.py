"""The ``vlforge`` console script: Ctrl-C at any moment ends the process with status 130 and one line.

The commands themselves turn Ctrl-C into exit status 130 (``flows.cli.user_errors``); this wrapper covers what lies
outside them: the imports before a command starts, and the interpreter's teardown after it ends. After an
interruption the process leaves through ``os._exit`` once the Python exit hooks have run: a Ray driver interrupted
half-way through connecting to its local cluster crashes (SIGSEGV) in its own shutdown and in the interpreter's
finalisation, so Ray's exit hook is skipped. The Ray processes of a local cluster share the driver's fate and end
with it; everything else (Prefect's ephemeral server, log uploads) runs its exit hooks as usual.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

INTERRUPTED = 130


def _leave(code: int, message: str | None = "interrupted") -> None:
    """Run the exit hooks (Ray's excepted), then end the process without the interpreter's finalisation."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the exit hooks
    ray = sys.modules.get("ray._private.worker")
    if ray is not None:
        atexit.unregister(ray.shutdown)
    if message:
        try:
            sys.stderr.write(message + "\n")
        except Exception:
            pass
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _interrupted_in_teardown(signum, frame) -> None:
    _leave(INTERRUPTED, message=None)


def run_app(app) -> None:
    """Run the Typer ``app`` with the Ctrl-C rules above; never returns."""
    try:
        app()
    except KeyboardInterrupt:  # outside a command (option parsing)
        _leave(INTERRUPTED)
    except SystemExit as exc:
        if exc.code == INTERRUPTED:
            _leave(INTERRUPTED, message=None)  # the command has said so already
        signal.signal(signal.SIGINT, _interrupted_in_teardown)  # the command is done: exit quietly
        raise


def main() -> None:
    try:
        from flows.cli import app
    except KeyboardInterrupt:  # while importing the stack (seconds on a small machine)
        _leave(INTERRUPTED)
    run_app(app)


if __name__ == "__main__":
    main()
