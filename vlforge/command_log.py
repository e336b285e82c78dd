"""Where a command's output goes while :func:`vlforge.console.session` is open: file descriptors 1 and 2 (and so
``sys.stdout``/``sys.stderr``, every library's stream handler, child processes, Ray's worker output printed by
the driver) point at the command's log file, or through a tee thread to it and the terminal (verbose); root
logging and Python warnings are recorded there too. People's output goes to duplicates of the original fds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time


def location(settings, command: str) -> tuple[str, str | None]:
    """``(local log path, s3:// URI it is uploaded to or None)`` for a command started now."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{stamp}-{os.getpid()}-{command}.log"
    if settings.storage_is_remote:
        return os.path.abspath(os.path.join(".vlforge-logs", name)), f"{settings.storage_uri}/logs/{name}"
    return os.path.join(settings.storage_uri, "logs", name), None


def _user_stream(stream):
    """A stream on the terminal this process started with: a duplicate of fd 1/2, or the object itself when it
    is not a real file (an in-process test runner's buffer)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return stream, None
    dup = os.dup(fd)
    return os.fdopen(dup, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8"), dup


class _Tee(threading.Thread):
    """Copies what is written to the redirected fds 1/2 to the log file and to the terminal (verbose)."""

    def __init__(self, read_fd: int, log_fd: int, term_fd: int):
        super().__init__(name="vlforge-log-tee", daemon=True)
        self.read_fd, self.log_fd, self.term_fd = read_fd, log_fd, term_fd

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            for fd in (self.log_fd, self.term_fd):
                with contextlib.suppress(OSError):
                    os.write(fd, chunk)


@contextlib.contextmanager
def redirected(path: str, *, verbose: bool = False):
    """Send fds 1/2, ``sys.stdout``/``sys.stderr``, root logging and warnings to the log file at ``path``;
    yields ``(user_out, user_err, is_terminal)``: streams on what stdout/stderr were, for people."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    sys.stdout.flush()
    sys.stderr.flush()
    user_out, out_dup = _user_stream(sys.stdout)
    user_err, err_dup = _user_stream(sys.stderr)
    saved = (sys.stdout, sys.stderr, os.dup(1), os.dup(2))
    tee = None
    if verbose:
        read_fd, target = os.pipe()
        tee = _Tee(read_fd, log_file.fileno(), err_dup if err_dup is not None else saved[3])
        tee.start()
    else:
        target = log_file.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    if verbose:
        os.close(target)
    # Streams on fds 1 and 2 themselves (never closed): a logging handler created during the session keeps
    # writing to whatever fd 2 is afterwards instead of to a closed file.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    undo = _capture_logging(sys.stderr)
    try:
        yield user_out, user_err, err_dup is not None and os.isatty(err_dup)
    finally:
        _release_logging(undo)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = saved[0], saved[1]
        os.dup2(saved[2], 1)
        os.dup2(saved[3], 2)
        for fd in (saved[2], saved[3]):
            os.close(fd)
        if tee is not None:
            tee.join(timeout=0.5)  # child processes that outlive the command may still hold the pipe open
        for stream, dup in ((user_out, out_dup), (user_err, err_dup)):
            if dup is not None:
                stream.close()
        log_file.close()


def upload(path: str, uri: str) -> None:
    """Copy the local log to the storage root (the local copy stays; a failure says where it is)."""
    from vlforge import storage

    try:
        with open(path, "rb") as f:
            storage.write_bytes_atomic(uri, f.read())
    except Exception as exc:
        from rich.console import Console

        Console(stderr=True).print(f"could not upload the log to {uri} ({exc}); it is at {path}")


def _capture_logging(stream) -> list:
    """Root logging to ``stream`` (the log file), Python warnings through logging; returns what to undo."""
    root, ours = logging.getLogger(), logging.getLogger("vlforge")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    undo = [(root, handler, root.level), (ours, None, ours.level)]
    # Ray's loggers do not propagate to the root once Ray has set them up (an earlier Ray in this process):
    # they get the log file too, for the session.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (
            (name == "ray" or name.startswith("ray."))
            and isinstance(logger, logging.Logger)
            and not logger.propagate
        ):
            logger.addHandler(handler)
            undo.append((logger, handler, logger.level))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    ours.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return undo


def _release_logging(undo: list) -> None:
    logging.captureWarnings(False)
    for logger, handler, level in undo:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(level)


def keep_ray_output_in(path: str) -> None:
    """From now on, send the output of Ray's workers that reaches this driver to the log at ``path``.

    Ray prints it as it arrives (Ray 2.5x: the ``ray_print_logs`` handler of its stdstream dispatcher, onto
    ``sys.stdout``/``sys.stderr`` of that moment), which can be after the command's last line, when the terminal
    is back. Without that handler (another Ray version) nothing changes."""
    if "ray" not in sys.modules:
        return
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except Exception:
        return
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return

    def to_log(data) -> None:
        with contextlib.suppress(Exception), open(path, "a", encoding="utf-8") as fh:
            ray_worker.print_worker_logs(data, fh)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_log)
    # Lines Ray's log deduplication still holds are printed onto sys.stdout/sys.stderr when Ray disconnects at
    # exit (Ray 2.5x, worker.disconnect): write them to the log now.
    with contextlib.suppress(Exception):
        from ray._private.ray_logging import stderr_deduplicator, stdout_deduplicator

        for dedup in (stdout_deduplicator, stderr_deduplicator):
            for leftover in dedup.flush():
                to_log(leftover)
