"""Per-host politeness over the whole run: at most ``connections`` requests in flight and ``rate`` request starts a
second to any one host (``host:port``), whichever process, thread or Ray worker sends them; a host's robots.txt
``Crawl-delay`` widens its interval (and allows one request at a time); a ``Retry-After`` answer holds the host
back for everyone.

One :class:`HostGate` lives in the ingest driver and answers over a TCP socket (``multiprocessing.connection``'s
key check, with a per-run random key): img2dataset's workers are separate processes (spawned, or Ray tasks that may run on other
nodes), so no in-process lock could bound them together. A worker thread asks ``acquire`` before each request and
says ``release`` after; an answer is either "go" or "ask again in t seconds" (the gate never blocks a socket), so
a request costs one small round trip to the driver and one message back (the release, unanswered).

After the key check the messages are fixed-size binary records on the raw socket (an op byte, a Retry-After, the
host's length, then the host; the answer is one double), not pickles over ``multiprocessing.connection``: its
framing, pickler set-up and ``poll`` cost a worker about as much CPU per request as the request itself on a fast
link (``bench/ingest_request.py``), and the driver's gate threads as much again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

POLL_S = 0.5  # the longest a worker sleeps before asking again (a slot freed by a release is seen soon)
ACCEPT_POLL_S = 0.2  # how soon the accepting thread notices the run is over
ANSWER_TIMEOUT_S = 120.0  # a gate that does not answer within this fails the request (never a silent hang)
# op (b"a"cquire, b"r"elease, b"h"old), seconds (hold), host length; then the host
_ASK = struct.Struct("!cdH")
_ANSWER = struct.Struct("!d")  # acquire's answer: 0.0 go, else seconds to wait
_OPS = {"acquire": b"a", "release": b"r", "hold": b"h"}


@dataclass(frozen=True)
class GateAddress:
    """What travels to the workers: where the gate listens and its key."""

    host: str
    port: int
    authkey: bytes = field(repr=False)


@dataclass
class _Host:
    active: int = 0
    next_start: float = 0.0  # monotonic time before which no request may start


class HostGate:
    """The per-host limits (thread-safe; served by :func:`serve`)."""

    def __init__(self, connections: int, rate: float, crawl_delays: dict[str, float] | None = None):
        self.connections, self.rate = max(1, int(connections)), float(rate)
        self.crawl_delays = dict(crawl_delays or {})
        self.hosts: dict[str, _Host] = {}
        self.lock = threading.Lock()

    def interval(self, host: str) -> float:
        base = 1.0 / self.rate if self.rate > 0 else 0.0
        return max(base, self.crawl_delays.get(host, 0.0))

    def try_acquire(self, host: str) -> float:
        """0.0: a request to ``host`` may start now (counted until :meth:`release`); else seconds to wait."""
        now = time.monotonic()
        limit = 1 if host in self.crawl_delays else self.connections
        with self.lock:
            state = self.hosts.setdefault(host, _Host())
            if state.active >= limit:
                return POLL_S / 10
            if now < state.next_start:
                return state.next_start - now
            state.active += 1
            state.next_start = now + self.interval(host)
            return 0.0

    def release(self, host: str) -> None:
        with self.lock:
            state = self.hosts.setdefault(host, _Host())
            state.active = max(0, state.active - 1)
            if host in self.crawl_delays:  # Crawl-delay: also between one request's end and the next start
                state.next_start = max(state.next_start, time.monotonic() + self.crawl_delays[host])

    def hold(self, host: str, seconds: float) -> None:
        """No request to ``host`` starts for ``seconds`` (a Retry-After)."""
        with self.lock:
            state = self.hosts.setdefault(host, _Host())
            state.next_start = max(state.next_start, time.monotonic() + seconds)


def _answer(gate: HostGate, sock: socket.socket, authkey: bytes) -> None:
    sock.setblocking(True)
    conn = Connection(sock.detach())
    try:  # the key check, in this connection's thread: a slow client holds up no one else
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
    except (AuthenticationError, OSError, EOFError):
        conn.close()
        return
    with _raw_socket(conn) as raw, raw.makefile("rb") as reader:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # an answer leaves at once
        try:
            while True:
                header = reader.read(_ASK.size)
                if len(header) < _ASK.size:
                    return  # the worker closed its end
                op, arg, length = _ASK.unpack(header)
                host = reader.read(length).decode()
                if op == b"a":
                    raw.sendall(_ANSWER.pack(gate.try_acquire(host)))
                elif op == b"r":  # no answer: the worker does not wait for it
                    gate.release(host)
                elif op == b"h":
                    gate.hold(host, arg)
        except OSError:  # the worker's process ended
            return


def _raw_socket(conn: Connection) -> socket.socket:
    """The connection's socket as a plain socket object (a duplicate descriptor; ``conn`` is closed), once the key
    check is done: the messages after it are raw records."""
    try:
        return socket.socket(fileno=os.dup(conn.fileno()))
    finally:
        conn.close()


@contextlib.contextmanager
def serve(gate: HostGate, bind: str = "127.0.0.1") -> Iterator[GateAddress]:
    """Answer ``gate``'s clients from threads of this process while the block runs. The listening socket has a
    deep backlog (every worker thread of every process connects at once when a run starts) and a short accept
    timeout, so the accepting thread sees the end of the block and exits."""
    authkey = secrets.token_bytes(32)
    server = socket.create_server((bind, 0), backlog=4096)
    server.settimeout(ACCEPT_POLL_S)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                sock, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=_answer, args=(gate, sock, authkey), daemon=True, name="vlforge-gate"
            ).start()

    thread = threading.Thread(target=accept, daemon=True, name="vlforge-gate-accept")
    thread.start()
    host, port = server.getsockname()[:2]
    try:
        yield GateAddress(host, port, authkey)
    finally:
        stop.set()
        thread.join(timeout=5 * ACCEPT_POLL_S)
        server.close()


class GateClient:
    """A worker process's handle on the gate: one connection per thread, opened on first use."""

    def __init__(self, address: GateAddress):
        self.address = address
        self.local = threading.local()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.address.host, self.address.port), timeout=ANSWER_TIMEOUT_S)
        sock.setblocking(True)
        conn = Connection(sock.detach())
        try:
            answer_challenge(conn, self.address.authkey)
            deliver_challenge(conn, self.address.authkey)
        except BaseException:
            conn.close()
            raise
        raw = _raw_socket(conn)
        raw.settimeout(ANSWER_TIMEOUT_S)  # the driver gone or stuck: the request fails, never hangs the shard
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return raw

    def _tell(self, op: str, host: str, arg: float = 0.0) -> socket.socket:
        sock = getattr(self.local, "sock", None)
        if sock is None:
            sock = self.local.sock = self._connect()
        name = host.encode()
        sock.sendall(_ASK.pack(_OPS[op], arg, len(name)) + name)
        return sock

    def _call(self, op: str, host: str, arg: float = 0.0) -> float:
        sock = self._tell(op, host, arg)
        answer = b""
        try:
            while len(answer) < _ANSWER.size:
                chunk = sock.recv(_ANSWER.size - len(answer))
                if not chunk:
                    raise ConnectionError("vlforge's per-host gate closed the connection")
                answer += chunk
        except OSError as exc:  # TimeoutError included
            self.local.sock = None
            sock.close()
            raise TimeoutError(
                f"vlforge's per-host gate did not answer within {ANSWER_TIMEOUT_S:.0f} s ({exc})"
            ) from None
        return _ANSWER.unpack(answer)[0]

    @contextlib.contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Wait for the gate's go for ``host``; hold the slot while the block runs."""
        while (wait := self._call("acquire", host)) > 0:
            time.sleep(min(wait, POLL_S))
        try:
            yield
        finally:
            self._tell("release", host)  # one message, no round trip

    def hold(self, host: str, seconds: float) -> None:
        self._tell("hold", host, seconds)
