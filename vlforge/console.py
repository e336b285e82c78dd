"""The console people read, and the log file that records everything else.

A CLI command runs inside :func:`session`. While it is open, file descriptors 1 and 2 (and ``sys.stdout``,
``sys.stderr``) point at the command's log file, so library logs, warnings, tqdm bars, Ray worker output that
reaches the driver and the output of child processes (img2dataset's workers) are recorded there and nothing else
reaches the terminal. What people see is written by the calls below, on the terminal the command started with.
With ``verbose`` the log is also shown live (a tee). Without a session (library use, tests calling the stage
functions) the calls only log to the ``vlforge`` logger.

The API stage code calls (small and stable)::

    from vlforge import console

    with console.stage("curate demo-pool"):      # "> curate demo-pool" ... "ok curate demo-pool (12.3 s)"
        with console.progress(total=n, unit="pairs", description="scoring") as bar:
            bar.advance(64)                     # live: count, total, rate; a closing line when done
            bar.update(completed=128, info="loss 0.41")   # absolute position and a short free text
        console.info("kept 420 of 600 pairs")   # a plain line for people (and the log)
        console.warn_user("12 rows have no caption: they are rejected as 'no_caption'")  # shown once

- ``stage(name)``: a line as it starts and one as it ends (with its duration, or that it failed). Inside a
  Prefect flow or task run the same lines go to the run's logs (the Prefect UI), nothing else of ours does.
  The caller of a stage function owns its stage (the CLI command, the flow); stage functions report progress.
- ``progress(total, unit, description, poll=None, every=1.0)``: a context manager yielding a handle with
  ``advance(n=1)`` and ``update(completed=None, total=None, info=None)``; thread-safe. ``total`` may be None (a
  count only). ``poll`` (a callable returning the count, or ``(count, info)``) is for work done elsewhere: it is
  called every ``every`` seconds while the display is live, and once at the end. The live display is drawn only
  on a terminal; in a pipe (and in the log) the closing line, with count, time and rate, is what remains.
- ``info(msg)``: one line on the console and in the log. ``warn_user(msg)``: a warning about the user's data
  or settings, in plain words, once per session; warnings the user cannot act on belong in the log only.
- ``log_path()``: where this command's log is (None outside a session).

Log files: ``<storage>/logs/<UTC time>-<pid>-<command>.log``. With ``s3://`` storage the log is written locally
to ``./.vlforge-logs/`` and uploaded to ``<storage>/logs/`` when the command ends (also after an error). The fd
plumbing lives in :mod:`vlforge.command_log`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("vlforge")


@dataclass
class _Session:
    command: str
    path: str  # the local log file
    upload_to: str | None  # s3:// URI the log goes to at the end
    out: object  # rich Console on the user's stdout
    err: object  # rich Console on the user's stderr
    warned: set[str] = field(default_factory=set)
    live: object | None = None  # rich Progress while a progress display is shown
    live_tasks: int = 0
    lock: threading.Lock = field(default_factory=threading.RLock)
    depth: int = 0  # nesting of stages, for indentation


_session: _Session | None = None


def log_path() -> str | None:
    """The log file of the running command (its final URI for s3:// storage), or None."""
    if _session is None:
        return None
    return _session.upload_to or _session.path


def terminal(stderr: bool = False):
    """The rich Console people see: the session's terminal, or a plain Console outside a session."""
    if _session is not None:
        return _session.err if stderr else _session.out
    from rich.console import Console

    return Console(stderr=stderr)


def _run_logger():
    """Prefect's run logger inside a flow or task run (so our lines reach the Prefect UI), else None."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return None
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return None


def _emit(msg: str, *, style: str = "", level: int = logging.INFO) -> None:
    log.log(level, msg)
    run_logger = _run_logger()
    if run_logger is not None:
        run_logger.log(level, msg)
    s = _session
    if s is None:
        return
    with s.lock:
        text = "  " * s.depth + msg
        target = s.live.console if s.live is not None else s.err
        target.print(f"[{style}]{_escape(text)}[/]" if style else _escape(text), highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def info(msg: str) -> None:
    """One line for people (and the log)."""
    _emit(msg)


def warn_user(msg: str) -> None:
    """A warning about the user's data or settings, shown once per session (once per process outside one)."""
    seen = _session.warned if _session is not None else _warned_outside
    if msg in seen:
        return
    seen.add(msg)
    _emit(f"warning: {msg}", style="yellow", level=logging.WARNING)


_warned_outside: set[str] = set()


@contextlib.contextmanager
def stage(name: str):
    """A line when the stage starts and one when it ends (with its duration, or that it failed)."""
    start = time.perf_counter()
    _emit(f"> {name}", style="bold")
    if _session is not None:
        _session.depth += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        if _session is not None:
            _session.depth -= 1
        took = _duration(time.perf_counter() - start)
        if ok:
            _emit(f"ok {name} ({took})", style="green")
        else:
            _emit(f"failed: {name} (after {took})", style="red", level=logging.ERROR)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """A handle on one live progress line (see :func:`progress`)."""

    def __init__(self, description: str, total: int | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.completed, self.info, self._task = 0, "", None
        self._start = time.perf_counter()
        self._lock = threading.Lock()

    def advance(self, n: float = 1) -> None:
        with self._lock:
            self.completed += n
            self._refresh()

    def update(
        self, completed: float | None = None, total: int | None = None, info: str | None = None
    ) -> None:
        with self._lock:
            if completed is not None:
                self.completed = completed
            if total is not None:
                self.total = total
            if info is not None:
                self.info = info
            self._refresh()

    def _refresh(self) -> None:
        s = _session
        if s is not None and s.live is not None and self._task is not None:
            s.live.update(self._task, completed=self.completed, total=self.total, info=self.info)

    def closing_line(self) -> str:
        took = time.perf_counter() - self._start
        count = f"{self.completed:,.0f}" + (f"/{self.total:,}" if self.total is not None else "")
        rate = f", {self.completed / took:,.1f} {self.unit}/s" if took > 0 and self.completed else ""
        extra = f", {self.info}" if self.info else ""
        return f"{self.description}: {count} {self.unit} in {_duration(took)}{rate}{extra}"


def _make_live(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as RichProgress

    class RateColumn(TextColumn):
        def render(self, task):
            from rich.text import Text

            speed = task.finished_speed or task.speed
            unit = task.fields.get("unit", "")
            return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="cyan")

    return RichProgress(
        TextColumn("  {task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TaskProgressColumn(),
        RateColumn(""),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
        # Our log file is sys.stdout/sys.stderr during a session: never capture it into the display.
        redirect_stdout=False,
        redirect_stderr=False,
        refresh_per_second=4,
    )


@contextlib.contextmanager
def progress(total: int | None, unit: str, description: str = "working", *, poll=None, every: float = 1.0):
    """A live progress line (count, total, rate) while the block runs; a closing line with the totals after.

    ``poll``: optional callable returning the count done so far, or ``(count, info)``; called every ``every``
    seconds on a background thread while a session shows the display, and once at the end (for work that
    happens elsewhere: img2dataset's processes, Ray Train workers). An exception in it is logged and ignored.
    """
    handle = Progress(description, total, unit)
    s = _session if _session is not None and _session.err.is_terminal else None  # no live display in a pipe
    if s is not None:
        with s.lock:
            if s.live is None:
                s.live = _make_live(s.err)
                s.live.start()
            s.live_tasks += 1
            handle._task = s.live.add_task(description, total=total, unit=unit, info="")
    stop = threading.Event()
    poller = None
    if poll is not None and s is not None:
        poller = threading.Thread(
            target=_poll_loop, args=(handle, poll, every, stop), name="vlforge-progress", daemon=True
        )
        poller.start()
    try:
        yield handle
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=max(5.0, 2 * every))
        if poll is not None:
            _poll_once(handle, poll)
        if s is not None:
            with s.lock:
                s.live.remove_task(handle._task)
                s.live_tasks -= 1
                if s.live_tasks == 0:
                    s.live.stop()
                    s.live = None
        _emit(handle.closing_line())


def _poll_once(handle: Progress, poll) -> None:
    try:
        value = poll()
    except Exception:
        log.debug("progress poll of %r failed", handle.description, exc_info=True)
        return
    if isinstance(value, tuple):
        handle.update(completed=value[0], info=value[1])
    elif value is not None:
        handle.update(completed=value)


def _poll_loop(handle: Progress, poll, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        _poll_once(handle, poll)


@contextlib.contextmanager
def session(command: str, settings, *, verbose: bool = False):
    """Run a command with a clean console and a full log file (see the module docstring); yields the log path
    (its s3:// URI for remote storage). Restores fds 1/2, ``sys.stdout``/``sys.stderr`` and logging at the end."""
    global _session
    if _session is not None:  # nested (a command calling another): the outer session records everything
        yield log_path()
        return
    from rich.console import Console

    from vlforge import command_log

    path, upload_to = command_log.location(settings, command)
    try:
        with command_log.redirected(path, verbose=verbose) as (user_out, user_err, is_terminal):
            force = is_terminal or None
            s = _Session(
                command,
                path,
                upload_to,
                out=Console(file=user_out, force_terminal=force, soft_wrap=True),
                err=Console(file=user_err, force_terminal=force, stderr=True, soft_wrap=True),
            )
            _session = s
            log.info("vlforge %s: %s", command, " ".join(sys.argv))
            try:
                yield log_path()
            finally:
                if s.live is not None:
                    s.live.stop()
                command_log.keep_ray_output_in(path)
                _session = None
    finally:
        if upload_to:  # also after an error: that is when the log is read
            command_log.upload(path, upload_to)
