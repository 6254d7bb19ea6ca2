"""nginx (docker/nginx/nginx.conf, Debian's package) in front of two gradweight servers.

Stateful methods' steps alternate between the replicas and give what one server gives; a replica
stopped mid-run leaves the run complete; the client's request ID, the body limit and body streaming
hold through nginx. `make test` installs nginx where it is missing.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradweight
import lb
from gradweight_server.settings import Settings

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(lb.nginx_bin() is None, reason="nginx missing: `make test` installs Debian's package"),
]
TOKEN = "lb-test-token"
STEPS = 4
SERVED = re.compile(r'^gradweight_requests_total\{route="/v1/combine",status="200"\} (\S+)$', re.M)
INFLIGHT = re.compile(r"^gradweight_inflight_requests (\S+)$", re.M)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """Two replicas (uvicorn servers of their own, on their own ports, in threads of this process: a
    server process would import torch again, most of this file's time) behind nginx."""
    reps = [lb.start_server(token=TOKEN), lb.start_server(token=TOKEN)]
    try:
        with lb.nginx([r.url for r in reps]) as url:
            yield {"url": url, "replicas": reps}
    finally:
        for r in reps:
            r.stop()


def served(url: str) -> int:
    found = SERVED.findall(httpx.get(url + "/metrics", timeout=10).text)
    return int(float(found[0])) if found else 0


def groups(step: int, k: int = 3) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    base = torch.randn(300, generator=gen)
    return {
        f"t{i}": [torch.randn(200, generator=gen) + 0.5 * base[:200], torch.randn(50, 2, generator=gen)]
        for i in range(k)
    }


def run(url: str, method: dict[str, Any], steps: int, between: Any = None) -> list[gradweight.CombineResult]:
    out, state = [], None
    with gradweight.Client(url, token=TOKEN) as client:
        for step in range(steps):
            if between is not None:
                between(step)
            res = client.combine(groups=groups(step), method=method, state=state)
            state = res.state
            out.append(res)
    return out


def same(got: list[gradweight.CombineResult], want: list[gradweight.CombineResult]) -> None:
    """The same server code on the same inputs: weights to 1e-12, gradients to float32 rounding."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for name, value in w.weights.items():
            assert abs(g.weights[name] - value) <= 1e-12 * max(1.0, abs(value)), (name, g.weights, w.weights)
        torch.testing.assert_close(g.scaled_grad, w.scaled_grad, rtol=1e-6, atol=1e-6)
        assert (g.state is None) == (w.state is None)


def stateful_methods(url: str) -> list[dict[str, Any]]:
    with gradweight.Client(url, token=TOKEN) as client:
        available = {m.name for m in client.methods() if getattr(m, "available", True)}
    methods = [{"name": "gradvac", "seed": 11}]
    if "nash_mtl" in available:
        methods.append({"name": "nash_mtl"})
    return methods


def test_stateful_steps_alternate_between_replicas_and_match_one_server(cluster):
    url, reps = cluster["url"], cluster["replicas"]
    for method in stateful_methods(url):
        one = run(reps[0].url, method, STEPS)  # one server, every step
        before = [served(r.url) for r in reps]
        through = run(url, method, STEPS)
        after = [served(r.url) for r in reps]
        # round robin: each replica served every other step, each step carrying the previous one's state
        assert [a - b for a, b in zip(after, before)] == [STEPS // 2, STEPS // 2], method
        assert all(r.state for r in through[:-1]), method
        same(through, one)


def test_request_id_is_kept_and_made_up_when_missing(cluster):
    url = cluster["url"]
    given = "trainer-42-step-7"
    r = httpx.get(url + "/v1/info", headers={"X-Request-ID": given, "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == given
    r = httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # nginx's $request_id


def _head(url: str, length: int) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        (
            f"POST /v1/combine HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
            "X-Request-ID: big-one\r\n\r\n"
        ).encode()
    )
    return sock


def test_body_over_the_server_limit_is_refused_by_nginx_as_problem_json(cluster):
    limit = Settings().max_body_bytes
    assert "client_max_body_size 2g;" in lb.NGINX_CONF.read_text()
    assert limit == 2 * 1024**3  # nginx's 2g: the two limits are the same number
    with _head(cluster["url"], limit + 1) as sock:
        data = b""
        deadline = time.monotonic() + 10
        while b"}" not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"application/problem+json" in head
    assert b"X-Request-ID: big-one" in head
    assert json.loads(body)["code"] == "payload-too-large"


def test_bodies_stream_through_nginx_unbuffered(cluster):
    """A replica admits the request while its body is still arriving: nginx does not spool it first."""
    url, reps = cluster["url"], cluster["replicas"]
    with _head(url, 64 * 1024 * 1024) as sock:
        sock.sendall(b"\0" * (1024 * 1024))  # 1 MiB of 64
        deadline = time.monotonic() + 20
        seen = 0.0
        while time.monotonic() < deadline and seen < 1:
            seen = sum(
                float(INFLIGHT.findall(httpx.get(u + "/metrics").text)[0]) for u in (r.url for r in reps)
            )
            time.sleep(0.05)
    assert seen >= 1
    text = lb.NGINX_CONF.read_text()
    assert "proxy_request_buffering off;" in text
    assert "proxy_buffering off;" in text


def test_no_replica_reachable_is_a_retryable_not_ready():
    """nginx's own 502/504 come back as the server's 503 `not-ready` problem with Retry-After, which
    the client retries: that is how its retries reach a replica that is up again."""
    dead = [f"http://127.0.0.1:{lb.free_port()}" for _ in range(2)]
    with lb.nginx(dead, ready=False) as url:
        r = httpx.post(url + "/v1/weights", json={}, headers={"X-Request-ID": "lost-1"}, timeout=10)
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "1"
    assert r.headers["x-request-id"] == "lost-1"
    assert r.json()["code"] == "not-ready"
    assert gradweight.NotReady in gradweight.RETRYABLE


def test_a_replica_failing_mid_request_the_client_retries_on_the_other(cluster):
    """A replica that drops each connection once the request has started streaming to it: nginx cannot
    replay a body it did not buffer, answers 503 `not-ready`, and the client's retry reaches the good one."""
    dropped = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def drop() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)  # the request has begun arriving ...
                dropped.append(1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # ... reset

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    good = cluster["replicas"][1]
    method = {"name": "gradvac", "seed": 9}
    try:
        with lb.nginx([f"http://127.0.0.1:{sock.getsockname()[1]}", good.url]) as url:
            one = run(good.url, method, STEPS)
            through = run(url, method, STEPS)
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
    assert dropped  # the bad replica was tried
    same(through, one)


def test_a_replica_stopped_mid_run_the_run_completes_on_the_other(cluster):
    """Last in this file: it stops replica 0."""
    url, reps = cluster["url"], cluster["replicas"]
    method = {"name": "gradvac", "seed": 5}
    steps = 6
    one = run(reps[1].url, method, steps)
    before = served(reps[1].url)

    def between(step: int) -> None:
        if step == 2:
            reps[0].stop()

    through = run(url, method, steps, between)
    same(through, one)
    assert not reps[0].thread.is_alive()
    assert served(reps[1].url) - before >= steps - 2  # every step after the stop went to replica 1
