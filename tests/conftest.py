"""Shared fixtures: real uvicorn servers of `create_app` on free loopback ports.

`live_server` (one per session, default settings with warm-up) and `make_server(**overrides)` (a fresh
server per call, e.g. with a token or tight limits) both yield a `LiveServer` with `.url` and `.settings`.
The server runs in a thread of the test process, so nothing outside 127.0.0.1 is touched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

READY_TIMEOUT_S = 60.0


@dataclass
class LiveServer:
    url: str
    settings: Any
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def _start(**overrides: Any) -> LiveServer:
    import uvicorn
    from gradweight_server.app import create_app
    from gradweight_server.main import server_config
    from gradweight_server.settings import Settings

    overrides.setdefault("device", "cpu")
    overrides.setdefault("shutdown_timeout_s", 5)
    settings = Settings(**overrides)
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(app, settings, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}"
    )
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", settings, app, server, thread)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if not thread.is_alive():
            raise RuntimeError("the test server exited during start-up")
        try:
            with urllib.request.urlopen(live.url + "/readyz", timeout=5) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            live.stop()
            raise RuntimeError(f"the test server was not ready within {READY_TIMEOUT_S} s")
        time.sleep(0.02)
    return live


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    """One server with default settings (CPU) for the whole session."""
    live = _start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., LiveServer]]:
    """Factory: `make_server(token="t", max_concurrency=1)`; every server is stopped after the test."""
    started: list[LiveServer] = []

    def factory(**overrides: Any) -> LiveServer:
        live = _start(**overrides)
        started.append(live)
        return live

    yield factory
    for live in started:
        with contextlib.suppress(Exception):
            live.stop()
