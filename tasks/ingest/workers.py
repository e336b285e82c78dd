"""img2dataset's processes forked from one warm server instead of spawned cold.

img2dataset starts a logger process and a pool of download workers for every list, each with the ``spawn`` start
method, and the pool replaces a worker every five shards. A spawned process imports img2dataset afresh (with
webdataset's torch, albumentations, pandas and wandb: seconds of CPU each time), so a list of a few shards spends
most of its time importing. Here they are started with the ``forkserver`` method instead: one server process imports
img2dataset and vlforge's download code once (per ingesting process, and kept for its life), and every logger and
worker after that is a fork of it, ready at once. The server is started from a fresh interpreter like a spawned
process, so forking from it is safe in a process that runs threads (Prefect, MLflow, pytest).

A forked process inherits the server's environment and standard streams, which are those of the server's start
(the first ingest's), not the current ones; so each process, as it starts, takes what a spawned one would have had:
the caller's environment at the time of this list (with what :func:`tasks.ingest.run.worker_environment` sets for
it, and the caller's storage credentials), and the caller's current fds 1 and 2 (the command's log file while a
``vlforge`` command runs), passed to it with the process like any other fd multiprocessing hands over.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import multiprocessing
import os
from multiprocessing.context import ForkProcess, ForkServerProcess

# Imported only where img2dataset runs (tasks.ingest.run's download, in the process that calls img2dataset).
from img2dataset.logger import LoggerProcess

# Imported once, in the server (this module imports img2dataset); every process forked from it has them. Named
# from this module's own name, which an installed wheel places under the vlforge package.
PRELOAD = [__name__, __name__.rpartition(".")[0] + ".fetch"]


def set_environment(env: dict[str, str], stdio: CallerStdio | None = None) -> None:
    """A forked process's environment: exactly ``env`` (a pool's initializer, the logger's first step); ``stdio``
    has already put the caller's streams in place, as it was unpickled."""
    os.environ.clear()
    os.environ.update(env)


def _take_streams(out, err) -> None:
    os.dup2(out.detach(), 1)
    os.dup2(err.detach(), 2)


class CallerStdio:
    """The caller's fds 1 and 2, as they are when a process is started from it: pickled with the process (a pool
    worker's initializer arguments, the logger's attributes), they are sent with it, and unpickling them in the
    new process makes them its fds 1 and 2."""

    def __reduce__(self):
        from multiprocessing.reduction import DupFd  # only while a process is being started

        return _take_streams, (DupFd(1), DupFd(2))


def forkserver_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    # Only the first call before the server starts counts; later calls change nothing (same list).
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class _PoolContext:
    """What img2dataset's distributor asks ``get_context("spawn")`` for: a pool, here of forked workers that set
    this list's environment before their first shard."""

    def __init__(self, env: dict[str, str]):
        self._ctx, self._env = forkserver_context(), env

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):  # noqa: N802 - as multiprocessing names it
        if initializer is not None:  # img2dataset passes none; if a later one does, it keeps its own
            return self._ctx.Pool(processes, initializer, initargs, maxtasksperchild)
        return self._ctx.Pool(processes, set_environment, (self._env, CallerStdio()), maxtasksperchild)

    def __getattr__(self, name):
        return getattr(self._ctx, name)


# True in a process that :class:`WarmChild` forked from the server: single-threaded and already warm when it starts, so
# it forks its own logger and workers directly (the parent's server is not reachable from it).
_IN_WARM_CHILD = False


class WarmChild(ForkServerProcess):
    """``target(*args)`` in a process forked from the warm server, with the caller's environment and streams: how a
    list ingested off the main thread runs img2dataset, which sets a SIGINT handler (only a main thread may), in a
    process of its own without importing img2dataset afresh each time."""

    def __init__(self, target, args: tuple, name: str):
        forkserver_context()  # the preload, before the server's first start
        super().__init__(target=target, args=args, name=name)
        self._vlforge_env, self._vlforge_stdio = dict(os.environ), CallerStdio()

    def run(self):
        global _IN_WARM_CHILD
        set_environment(self._vlforge_env, self._vlforge_stdio)
        _IN_WARM_CHILD = True
        super().run()


class _ForkContext:
    """In a warm child: img2dataset's spawn context answered with plain forks of this process."""

    def __init__(self):
        self._ctx = multiprocessing.get_context("fork")

    def __getattr__(self, name):
        return getattr(self._ctx, name)


class ChildLoggerProcess(LoggerProcess):
    """img2dataset's logger process, forked from a warm child (which already has this list's environment)."""

    _start_method = ForkProcess._start_method
    _Popen = staticmethod(ForkProcess._Popen)


class ForkedLoggerProcess(LoggerProcess):
    """img2dataset's logger process (a SpawnProcess), forked from the server, with this list's environment."""

    _start_method = ForkServerProcess._start_method
    _Popen = staticmethod(ForkServerProcess._Popen)

    def __init__(self, *args, env: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._vlforge_env, self._vlforge_stdio = env, CallerStdio()

    def run(self):
        set_environment(self._vlforge_env, self._vlforge_stdio)
        super().run()


@contextlib.contextmanager
def forked_processes():
    """While img2dataset downloads with its multiprocessing distributor, its logger and its workers are forked
    from the warm server, each with the environment of the caller at this point."""
    env = dict(os.environ)
    forkserver_context()  # the preload set before img2dataset starts its logger, the first process it starts
    distributor = importlib.import_module("img2dataset.distributor")
    i2d_main = importlib.import_module("img2dataset.main")
    saved = distributor.get_context, i2d_main.LoggerProcess
    if _IN_WARM_CHILD:
        pools, i2d_main.LoggerProcess = _ForkContext, ChildLoggerProcess
    else:
        pools, i2d_main.LoggerProcess = (
            functools.partial(_PoolContext, env),
            functools.partial(ForkedLoggerProcess, env=env),
        )
    distributor.get_context = lambda method=None: pools() if method == "spawn" else saved[0](method)
    try:
        yield
    finally:
        distributor.get_context, i2d_main.LoggerProcess = saved
