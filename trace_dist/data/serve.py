"""A prepared directory served over HTTP on 127.0.0.1: the loopback server of the tests and the benchmark.

    with LoopbackServer("data/pydoc") as server:   # server.url: http://127.0.0.1:PORT, serving data/pydoc/NAME
        cfg = DataConfig(path=server.url)

`stop()` and `start()` take it down and bring it back on the same port (a server that went away
mid-run); `fail_next(n)` answers the next n requests with 503 (a transient error).
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.server.owner.take_failure():
            self.send_error(503, "injected failure")
            return
        super().do_GET()

    def log_message(self, *args):  # no line per request on stderr
        pass


class LoopbackServer:
    def __init__(self, directory: str | Path):
        self.directory, self.port = str(directory), 0
        self.server = self.thread = None
        self.failures, self.lock = 0, threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LoopbackServer":
        handler = functools.partial(_Handler, directory=self.directory)
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)  # port 0 the first time: any free
        self.server.owner, self.port = self, self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="loopback-http", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=10)
            self.server = None

    def fail_next(self, n: int) -> None:
        with self.lock:
            self.failures = n

    def take_failure(self) -> bool:
        with self.lock:
            self.failures, failed = max(self.failures - 1, 0), self.failures > 0
        return failed

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
