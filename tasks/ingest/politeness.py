"""Per-host politeness over the whole run: at most ``connections`` requests in flight and ``rate`` request starts a
second to any one host (``host:port``), whichever process, thread or Ray worker sends them; a host's robots.txt
``Crawl-delay`` widens its interval (and allows one request at a time); a ``Retry-After`` answer holds the host
back for everyone.

One :class:`HostGate` lives in the ingest driver for the run. Its state is a table of hosts in a file under
``/dev/shm`` (memory, not disk) that every process on the driver's machine maps: img2dataset's worker processes
read and update it themselves, under a lock (``flock`` on the file, plus a thread lock within a process), so a
request costs a few microseconds of the worker's own CPU and waits for no other process. Asking the driver over a
socket instead cost a worker about as much CPU per request as img2dataset's whole request, and a wait for the
driver's gate thread to be scheduled on a busy machine (``bench/ingest_request.py``, py-spy in BENCHMARKS.md).

Ray workers on other nodes cannot map the file: for them the driver also serves the gate over TCP
(``multiprocessing.connection``'s key check with a per-run random key, then fixed-size binary records: an op
byte, a Retry-After, the host's length, then the host; the answer to an acquire is one double), and its threads
answer from the same table, so the limits hold over every process of the run, whichever way it asks. A worker
asks ``acquire`` before each request and says ``release`` after; an answer is either "go" or "ask again in t
seconds" (the gate never blocks).

The table has 65,536 entries: a host takes the first free one of eight after its hash. Where all eight hold
other hosts (rare until a run nears tens of thousands of hosts), it shares the first: the two hosts' requests are
then counted together, so each host's limits still hold and one may wait for the other; no limit is loosened.
The run removes its table's file when it ends; a run killed before then cannot, and the next gate created on the
machine removes the tables whose creating process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import socket
import struct
import tempfile
import threading
import time
import weakref
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
_HEADER = struct.Struct("<id")  # the table's: connections, rate
_FIRST_ENTRY = 64  # the header's room
# a host's entry: key (0: free), active, limit, next_start (monotonic), crawl_delay
_ENTRY = struct.Struct("<Qiidd")
ENTRIES = 1 << 16
PROBES = 8
_PREFIX = "vlforge-gate-"
_TABLE_BYTES = _FIRST_ENTRY + ENTRIES * _ENTRY.size


@dataclass(frozen=True)
class GateAddress:
    """What travels to the workers: where the gate listens and its key."""

    host: str
    port: int
    authkey: bytes = field(repr=False)
    table: str | None = None  # the table's file: mapped where it exists (the driver's machine), else TCP


def _key(host: str) -> int:
    """A host's 64-bit key in the table, the same in every process (``hash`` is salted per process); never 0."""
    return int.from_bytes(hashlib.blake2b(host.encode(), digest_size=8).digest(), "little") | 1


def _table_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class _Table:
    """The per-host state in a mapped file, shared by the processes of one machine; each process opens it once
    (its own open file, so ``flock`` excludes the other processes; a thread lock, this process's other threads).
    A process that dies holding the lock releases it with its file."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self._closed = weakref.finalize(self, os.close, fd)  # the mapping closes with the object
        self.map = mmap.mmap(fd, _TABLE_BYTES)
        self.connections, self.rate = _HEADER.unpack_from(self.map, 0)
        self.thread_lock = threading.Lock()
        self.offsets: dict[str, int] = {}  # host -> its entry, found once per process

    @classmethod
    def create(cls, connections: int, rate: float) -> _Table:
        _remove_orphans()
        # mode 0600: this user only; the creator's pid in the name, so that a later run can tell it is orphaned
        fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=_table_dir())
        os.ftruncate(fd, _TABLE_BYTES)  # zeros: every entry free
        with open(fd, "r+b", closefd=False) as f:
            f.write(_HEADER.pack(connections, rate))
        return cls(path, fd)

    @classmethod
    def open(cls, path: str) -> _Table | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:  # another machine (a Ray node), or the run is over
            return None
        return cls(path, fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self.thread_lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def offset(self, host: str) -> int:
        """The entry of ``host`` (under the lock): its own, a free one it takes, or its first one shared."""
        offset = self.offsets.get(host)
        if offset is not None:
            return offset
        key = _key(host)
        first = _FIRST_ENTRY + (key % ENTRIES) * _ENTRY.size
        offset = first
        for probe in range(PROBES):
            at = _FIRST_ENTRY + ((key + probe) % ENTRIES) * _ENTRY.size
            held = _ENTRY.unpack_from(self.map, at)[0]
            if held == key:
                offset = at
                break
            if held == 0:
                _ENTRY.pack_into(self.map, at, key, 0, self.connections, 0.0, 0.0)
                offset = at
                break
        if len(self.offsets) < 1 << 20:
            self.offsets[host] = offset
        return offset

    def close(self) -> None:
        self.map.close()
        self._closed()


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _remove_orphans() -> None:
    """Remove the tables of runs whose driver is gone (killed: a run that ends removes its own), so that killed
    runs do not pile up in memory. A table whose creator's pid is alive (or reused) is left alone; removing a live
    one by mistake (another pid namespace sharing the directory) would only send its new workers to TCP."""
    folder = _table_dir()
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            pid = name[len(_PREFIX) :].split("-", 1)[0]
            if not (name.startswith(_PREFIX) and pid.isdigit()):
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                _unlink(os.path.join(folder, name))
            except OSError:  # alive, someone else's
                pass


class HostGate:
    """The per-host limits, in a :class:`_Table` this process created (thread-safe, and process-safe with the
    processes that open the table's file; served over TCP by :func:`serve`)."""

    def __init__(self, connections: int, rate: float, crawl_delays: dict[str, float] | None = None):
        self.connections, self.rate = max(1, int(connections)), float(rate)
        self.table = _Table.create(self.connections, self.rate)
        self._cleanup = weakref.finalize(self, _unlink, self.table.path)
        with self.table.locked():
            for host, delay in (crawl_delays or {}).items():  # Crawl-delay: one request at a time, spaced
                at = self.table.offset(host)
                key, active, _, next_start, shared_delay = _ENTRY.unpack_from(self.table.map, at)
                _ENTRY.pack_into(self.table.map, at, key, active, 1, next_start, max(delay, shared_delay))

    @property
    def path(self) -> str:
        return self.table.path

    def close(self) -> None:
        """Remove the table's file (workers that have it open keep it until they close it)."""
        self._cleanup()

    def try_acquire(self, host: str) -> float:
        return try_acquire(self.table, host)

    def release(self, host: str) -> None:
        release(self.table, host)

    def hold(self, host: str, seconds: float) -> None:
        hold(self.table, host, seconds)


def try_acquire(table: _Table, host: str) -> float:
    """0.0: a request to ``host`` may start now (counted until :func:`release`); else seconds to wait."""
    with table.locked():
        at = table.offset(host)
        key, active, limit, next_start, delay = _ENTRY.unpack_from(table.map, at)
        if active >= limit:
            return POLL_S / 10
        now = time.monotonic()  # one clock for all processes of the machine (CLOCK_MONOTONIC)
        if now < next_start:
            return next_start - now
        base = 1.0 / table.rate if table.rate > 0 else 0.0
        _ENTRY.pack_into(table.map, at, key, active + 1, limit, now + max(base, delay), delay)
        return 0.0


def release(table: _Table, host: str) -> None:
    with table.locked():
        at = table.offset(host)
        key, active, limit, next_start, delay = _ENTRY.unpack_from(table.map, at)
        if delay:  # Crawl-delay: also between one request's end and the next start
            next_start = max(next_start, time.monotonic() + delay)
        _ENTRY.pack_into(table.map, at, key, max(0, active - 1), limit, next_start, delay)


def hold(table: _Table, host: str, seconds: float) -> None:
    """No request to ``host`` starts for ``seconds`` (a Retry-After)."""
    with table.locked():
        at = table.offset(host)
        key, active, limit, next_start, delay = _ENTRY.unpack_from(table.map, at)
        next_start = max(next_start, time.monotonic() + seconds)
        _ENTRY.pack_into(table.map, at, key, active, limit, next_start, delay)


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
        yield GateAddress(host, port, authkey, gate.path)
    finally:
        stop.set()
        thread.join(timeout=5 * ACCEPT_POLL_S)
        server.close()
        gate.close()  # the file goes; this process's mapping (and any worker's) stays valid


class GateClient:
    """A worker process's handle on the gate: the table itself where its file can be opened (a process on the
    driver's machine), else one TCP connection per thread, opened on first use."""

    def __init__(self, address: GateAddress):
        self.address = address
        self.local = threading.local()
        self.table = _Table.open(address.table) if address.table else None

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
        table = self.table
        if table is not None:
            while (wait := try_acquire(table, host)) > 0:
                time.sleep(min(wait, POLL_S))
            try:
                yield
            finally:
                release(table, host)
            return
        while (wait := self._call("acquire", host)) > 0:
            time.sleep(min(wait, POLL_S))
        try:
            yield
        finally:
            self._tell("release", host)  # one message, no round trip

    def hold(self, host: str, seconds: float) -> None:
        if self.table is not None:
            hold(self.table, host, seconds)
        else:
            self._tell("hold", host, seconds)
