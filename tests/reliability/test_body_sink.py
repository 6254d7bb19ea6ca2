"""Bodies received straight into their buffer (body_sink.py): the connection's framing and the request's
accounting stay exact whatever the client does mid-body.

A body of 256 KiB or more with a Content-Length is read by a BodySink that borrows the transport from the
HTTP protocol; these tests hold the hand-back to account: keep-alive and pipelined requests after a lent
body, `Expect: 100-continue`, a body sent in tiny pieces, a stall and a disconnect half way (admission
and bytes released, the server still serving). Every socket goes to 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
from rel_util import body_of, check_answer, make_groups, served, wait_until

pytestmark = pytest.mark.reliability

SPEC = {"name": "munba"}
NUMEL = 100_000  # 800 KB of body: lent


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    return socket.create_connection((host, int(port)), timeout=30)


def _head(length: int, extra: str = "") -> bytes:
    return (
        "POST /v1/combine HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


class Reader:
    """HTTP/1.1 responses with Content-Length off one socket, keeping what follows each for the next."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _more(self, deadline: float) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk or time.monotonic() > deadline:
            raise ConnectionError(f"closed or late after {self.data[:200]!r}")
        self.data += chunk

    def response(self, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.data:
            self._more(deadline)
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.data) < length:
            self._more(deadline)
        body, self.data = self.data[:length], self.data[length:]
        return int(lines[0].split()[1]), headers, body


def _idle(live: Any) -> bool:
    adm = live.app.state.runtime.admission
    return bool(adm.bytes == 0 and adm.requests == 0)


def test_keep_alive_and_a_pipelined_request_after_a_lent_body(live_server: Any) -> None:
    groups = [make_groups(seed, NUMEL, n_tensors=7) for seed in (1, 2)]
    bodies = [body_of(g, SPEC) for g in groups]
    sock = _connect(live_server.url)
    reader = Reader(sock)
    with sock:
        for g, body in zip(groups, bodies):
            sock.sendall(_head(len(body)) + body)
            status, _, content = reader.response()
            assert status == 200, content[:300]
            check_answer(content, SPEC, g)
        sock.sendall(_head(len(bodies[0])) + bodies[0] + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, content = reader.response()
        assert status == 200
        check_answer(content, SPEC, groups[0])
        status, _, content = reader.response()
        assert status == 200, content


def test_expect_100_continue_is_answered_before_the_body(live_server: Any) -> None:
    groups = make_groups(3, NUMEL)
    body = body_of(groups, SPEC)
    sock = _connect(live_server.url)
    reader = Reader(sock)
    with sock:
        sock.sendall(_head(len(body), "Expect: 100-continue\r\n"))
        status, _, _ = reader.response(timeout=10)
        assert status == 100
        sock.sendall(body)
        status, _, content = reader.response()
        assert status == 200, content[:300]
        check_answer(content, SPEC, groups)


def test_a_body_in_tiny_pieces_arrives_whole(live_server: Any) -> None:
    groups = make_groups(4, NUMEL, n_tensors=5)
    body = body_of(groups, SPEC)
    sock = _connect(live_server.url)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = Reader(sock)
    with sock:
        sock.sendall(_head(len(body)) + body[:100])
        time.sleep(0.2)  # the sink is lent while only the head and 100 bytes have arrived
        for i in range(100, len(body), 40_000):
            sock.sendall(body[i : i + 40_000])
        status, _, content = reader.response()
        assert status == 200, content[:300]
        check_answer(content, SPEC, groups)


def test_a_stalled_body_times_out_and_frees_what_it_held(make_server: Any) -> None:
    live = make_server(warmup=False, body_timeout_s=1.0)
    body = body_of(make_groups(5, NUMEL), SPEC)
    sock = _connect(live.url)
    reader = Reader(sock)
    with sock:
        sock.sendall(_head(len(body)) + body[: len(body) // 2])
        started = time.monotonic()
        status, headers, content = reader.response(timeout=20)
        assert status == 400, content[:300]
        assert headers["content-type"].startswith("application/problem+json")
        assert json.loads(content)["code"] == "malformed-body"
        assert b"did not arrive in time" in content
        assert headers.get("connection") == "close"
        assert time.monotonic() - started < 15
    assert wait_until(lambda: _idle(live), 10)
    served(live.url, numel=NUMEL)


def test_a_client_gone_mid_body_frees_what_it_held(make_server: Any) -> None:
    live = make_server(warmup=False)
    body = body_of(make_groups(6, NUMEL), SPEC)
    sock = _connect(live.url)
    sock.sendall(_head(len(body)) + body[: len(body) // 3])
    assert wait_until(lambda: live.app.state.runtime.admission.requests == 1, 10)
    sock.close()
    assert wait_until(lambda: _idle(live), 10)
    served(live.url, numel=NUMEL)
