"""Admission, overload, disconnects, readiness, device errors, internal errors, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import warnings
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from gradweight_server import engine
from gradweight_server.app import create_app
from gradweight_server.routers import combine as combine_router
from gradweight_server.settings import Settings
from srv_util import OCTET, expect, random_groups, safetensors_body

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx2, not ours to act on
    from fastapi.testclient import TestClient

MUNBA = {"method": {"name": "munba"}}


def _open_upload(url: str, total: int, sent: bytes) -> socket.socket:
    """A request whose body is still arriving: headers and the first bytes only."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(
        f"POST /v1/combine HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {total}\r\n\r\n".encode()
        + sent
    )
    return sock


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_an_upload_in_progress_holds_no_compute_slot(make_server):
    """Only finished uploads take compute slots: a half-sent body leaves the one slot to others."""
    live = make_server(max_concurrency=1, warmup=False)
    adm = live.app.state.runtime.admission
    body = safetensors_body(random_groups(1), metadata=MUNBA)
    held = _open_upload(live.url, len(body), body[:10])
    _wait(lambda: adm.requests == 1)
    assert adm.computing == 0
    resp = httpx.post(f"{live.url}/v1/combine", content=body, headers=OCTET)
    assert resp.status_code == 200, resp.text
    assert httpx.get(f"{live.url}/healthz").status_code == 200
    held.sendall(body[10:])
    reply = held.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    held.close()
    _wait(lambda: adm.requests == 0)
    assert httpx.post(f"{live.url}/v1/combine", content=body, headers=OCTET).status_code == 200


def test_overloaded_by_bytes(make_server):
    """A body reserves 1.5 times its size (itself and its reply) while it arrives."""
    live = make_server(max_concurrency=4, max_body_bytes=10_000, max_inflight_bytes=20_000, warmup=False)
    adm = live.app.state.runtime.admission
    body = safetensors_body(random_groups(2, shapes=((900,),)), metadata=MUNBA)
    assert 6000 < len(body) < 10_000
    held = _open_upload(live.url, len(body), body[:10])
    _wait(lambda: adm.bytes == len(body) * 3 // 2)
    expect(httpx.post(f"{live.url}/v1/combine", content=body, headers=OCTET), 503, "overloaded")
    held.close()
    _wait(lambda: adm.requests == 0 and adm.bytes == 0)
    assert httpx.post(f"{live.url}/v1/combine", content=body, headers=OCTET).status_code == 200


def test_disconnect_mid_upload_frees_the_buffer(make_server):
    live = make_server(max_concurrency=1, warmup=False)
    adm = live.app.state.runtime.admission
    body = safetensors_body(random_groups(3), metadata=MUNBA)
    for _ in range(3):
        sock = _open_upload(live.url, len(body), body[: len(body) // 2])
        _wait(lambda: adm.requests == 1)
        sock.close()
        _wait(lambda: adm.requests == 0 and adm.bytes == 0)
    assert httpx.post(f"{live.url}/v1/combine", content=body, headers=OCTET).status_code == 200


def test_health_and_metrics_answer_during_a_long_combine(make_server, monkeypatch):
    live = make_server(warmup=False)
    entered, release = threading.Event(), threading.Event()
    real_run = engine.run

    def slow_run(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(combine_router, "run", slow_run)
    groups = random_groups(4)
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.setdefault(
            "resp",
            httpx.post(
                f"{live.url}/v1/combine",
                content=safetensors_body(groups, metadata=MUNBA),
                headers=OCTET,
                timeout=60,
            ),
        )
    )
    worker.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{live.url}/healthz", timeout=5).status_code == 200
        metrics = httpx.get(f"{live.url}/metrics", timeout=5).text
        assert "gradweight_inflight_requests 1.0" in metrics
    finally:
        release.set()
        worker.join(60)
    assert result["resp"].status_code == 200


@pytest.fixture
def unstarted_client():
    """A TestClient whose lifespan has not run: the device is not initialised and not warmed up."""
    return TestClient(create_app(Settings(device="cpu")), raise_server_exceptions=False)


def test_not_ready_before_warm_up(unstarted_client):
    expect(unstarted_client.get("/readyz"), 503, "not-ready")
    body = safetensors_body(random_groups(5), metadata=MUNBA)
    resp = unstarted_client.post("/v1/combine", content=body, headers=OCTET)
    expect(resp, 503, "not-ready")
    assert "retry-after" in resp.headers
    assert unstarted_client.get("/healthz").status_code == 200


def test_ready_after_warm_up():
    with TestClient(create_app(Settings(device="cpu"))) as client:
        _wait(lambda: client.get("/readyz").status_code == 200)
        assert client.get("/readyz").json()["device"] == "cpu"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            503,
            "device-out-of-memory",
        ),
        (MemoryError(), 503, "device-out-of-memory"),
        (RuntimeError("secret internals at /srv/x.py line 3"), 500, "internal"),
    ],
    ids=["cuda-oom", "host-oom", "internal"],
)
def test_device_and_internal_errors(monkeypatch, caplog, exc, status, code):
    def failing_run(*args, **kwargs):
        raise exc

    monkeypatch.setattr(combine_router, "run", failing_run)
    with TestClient(
        create_app(Settings(device="cpu", warmup=False)), raise_server_exceptions=False
    ) as client:
        body = safetensors_body(random_groups(6), metadata=MUNBA)
        with caplog.at_level(logging.INFO, logger="gradweight_server"):
            resp = client.post("/v1/combine", content=body, headers=OCTET | {"x-request-id": "req-77"})
            body2 = expect(resp, status, code)
            assert "secret" not in resp.text
            assert "Traceback" not in resp.text
            assert resp.headers["x-request-id"] == "req-77"
            assert body2.get("request_id") in (None, "req-77")
            assert client.get("/healthz").status_code == 200
    if code == "internal":
        assert any("req-77" in r.getMessage() and r.exc_info for r in caplog.records)


def test_one_structured_log_line_per_request(caplog):
    with (
        TestClient(create_app(Settings(device="cpu", warmup=False))) as client,
        caplog.at_level(logging.INFO, logger="gradweight_server.access"),
    ):
        body = safetensors_body(random_groups(7), metadata=MUNBA)
        client.post("/v1/combine", content=body, headers=OCTET | {"x-request-id": "log-1"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gradweight_server.access"]
    line = next(x for x in lines if x["request_id"] == "log-1")
    assert line["status"] == 200
    assert line["bytes_in"] == len(body)
    assert line["bytes_out"] > 0
    assert line["method"] == "munba"
    assert {"decode_ms", "compute_ms", "encode_ms"} <= set(line)


def test_unknown_path_is_problem_json(live_server):
    resp = httpx.get(f"{live_server.url}/v2/nothing")
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/problem+json")
    resp = httpx.get(f"{live_server.url}/v1/combine")
    assert resp.status_code == 405


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GRADWEIGHT_MAX_CONCURRENCY", "7")
    monkeypatch.setenv("GRADWEIGHT_TOKEN", "abc")
    monkeypatch.setenv("GRADWEIGHT_DEVICE", "cpu")
    s = Settings()
    assert s.max_concurrency == 7
    assert s.token is not None
    assert s.token.get_secret_value() == "abc"
    assert "abc" not in repr(s)
    with pytest.raises(ValueError, match="max_body_bytes"):
        Settings(max_body_bytes=10, max_inflight_bytes=5)


def test_console_script_help():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gradweight_server.main", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "--device" in out.stdout
    assert "--port" in out.stdout


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
def test_slow_bodies_are_dropped(make_server, trickle):
    # A 10 kB body at 10 kB/s has 0.5 + 1 s; it may pause 0.5 s. Trickling it, it gets no more than that.
    live = make_server(max_concurrency=1, warmup=False, body_timeout_s=0.5, body_min_rate=10_000)
    adm = live.app.state.runtime.admission
    sock = _open_upload(live.url, 10_000, b"\0" * 100)
    try:
        _wait(lambda: adm.requests == 1)
        deadline = time.monotonic() + 10
        while adm.requests and time.monotonic() < deadline:
            if trickle:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\0")
            time.sleep(0.1)
        assert adm.requests == 0
        assert adm.bytes == 0
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 400")
        assert b"malformed-body" in reply
    finally:
        sock.close()
    assert (
        httpx.post(
            f"{live.url}/v1/combine",
            content=safetensors_body(random_groups(8), metadata=MUNBA),
            headers=OCTET,
        ).status_code
        == 200
    )


def test_buffer_pool_reuses_only_unexported_buffers():
    from gradweight_server.pool import BufferPool

    pool = BufferPool(max_bytes=100)
    pool.take(40)
    a = pool.take(40)
    pool.give(a)
    view = memoryview(a)
    assert pool.take(40) is not a  # still exported: a fresh buffer instead
    view.release()
    assert pool.take(40) is a
    for _ in range(4):
        pool.give(bytearray(40))
    assert pool.held <= 100


def test_buffer_pool_keeps_only_sizes_asked_for_again():
    from gradweight_server.pool import BufferPool

    pool = BufferPool(max_bytes=1000)
    one_off = pool.take(30)
    pool.give(one_off)
    assert pool.held == 0  # a size seen once is not kept: random sizes do not fill the pool
    first = pool.take(50)
    pool.give(first)
    second = pool.take(50)
    pool.give(second)
    assert pool.held == 50
    assert pool.take(50) is second


def test_a_lease_gives_its_buffer_back_exactly_once():
    import mmap

    from gradweight_server.pool import BufferPool

    pool = BufferPool(max_bytes=1 << 20)
    for _ in range(2):  # a size asked for twice is kept (a trainer's second step)
        assert pool.reuse(4096) is None  # nothing pooled: no memory is made up front
    buf = mmap.mmap(-1, 4096)
    lease = pool.adopt(buf)
    with lease as held:
        assert held is buf
    lease.close()  # a second close (the request record closes every lease again) is a no-op
    assert pool.held == 4096
    assert lease.buffer is not buf  # the lease no longer keeps the buffer alive
    view = memoryview(buf)
    assert pool.reuse(4096) is None  # an mmap with a live view is not handed out
    view.release()
    again = pool.reuse(4096)
    assert again is not None
    assert again.buffer is buf
