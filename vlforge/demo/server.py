"""A small threaded HTTP server on 127.0.0.1 that serves in-memory routes (the demo images, test fixtures).

A route is either a static :class:`Response` or a callable taking the request handler, so tests can serve
redirects, slow bodies, truncated bodies or arbitrary status codes from the same real server.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vlforge.demo.synth import SynthPair


@dataclass
class Response:
    body: bytes
    content_type: str = "image/jpeg"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


Route = Response | Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass

    def do_HEAD(self):  # noqa: N802
        self._serve(head=True)

    def do_GET(self):  # noqa: N802
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        self.server.hits[path] = self.server.hits.get(path, 0) + 1
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404, "not found")
            return
        if callable(route):
            route(self)
            return
        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(route.body)))
        for k, v in route.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            try:
                self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # An ingest opens dozens of connections at once; socketserver's listen backlog of 5 makes the kernel drop the
    # rest, and each dropped connection waits a SYN retransmit (1 s and more) before it is served.
    request_queue_size = 1024

    def __init__(self, addr):
        super().__init__(addr, _Handler)
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}


class ImageServer:
    """``with ImageServer() as srv: srv.add('/a.jpg', Response(data)); srv.url('/a.jpg')``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = _Server((host, port))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hits(self) -> dict[str, int]:
        return self._server.hits

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, route: Route) -> str:
        self._server.routes[path] = route
        return self.url(path)

    def add_pairs(self, pairs: Iterable[SynthPair]) -> list[str]:
        return [self.add(f"/img/{p.key}.jpg", Response(p.image)) for p in pairs]

    def start(self) -> ImageServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="vlforge-image-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def write_url_list(
    path: str,
    pairs: Iterable[SynthPair],
    urls: Iterable[str],
    questions: Sequence[tuple[str, str]] = (),
) -> str:
    """Write a CSV URL list (url, caption, plus the known truth as extra columns: the image's class is
    ``label``, "red circle", what a labelled eval set carries) and return its path. With ``questions``
    (instructions and the pair attribute that answers each, e.g. ``synth.INSTRUCTIONS[0]`` and
    ``synth.DESCRIBE``), every row also gets ``prompt`` and ``response`` columns, the questions taking turns
    row by row: an instruction set for a VLM's stage 2."""
    header = ["url", "caption", "truth_matched", "truth_colour", "truth_shape", "label"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + (["prompt", "response"] if questions else []))
        for i, (p, u) in enumerate(zip(pairs, urls, strict=True)):
            row = [u, p.caption, int(p.matched), p.colour, p.shape, f"{p.colour} {p.shape}"]
            if questions:
                prompt, attribute = questions[i % len(questions)]
                row += [prompt, getattr(p, attribute)]
            w.writerow(row)
    return path
