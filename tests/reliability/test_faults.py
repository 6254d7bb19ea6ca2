"""Faults: clients that vanish mid-upload or mid-download, slow bodies, SIGTERM mid-request and device OOM.

After each, the server has released the request's admission slot and bytes, its memory comes back, and the
next request is served correctly.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from gradweight_server.routers import combine
from rel_util import (
    OCTET,
    alive,
    body_of,
    check_answer,
    make_groups,
    open_request,
    problem,
    read_response,
    rss_bytes,
    served,
    subprocess_server,
    wait_until,
)

pytestmark = pytest.mark.reliability

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
SPEC = {"name": "munba"}


def _admission(live: Any) -> Any:
    return live.app.state.runtime.admission


def _idle(live: Any, timeout: float = 10.0) -> bool:
    adm = _admission(live)
    return wait_until(lambda: adm.requests == 0 and adm.bytes == 0, timeout)


def _head(length: int, path: str = "/v1/combine") -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}"
    )


# ---- clients that go away ------------------------------------------------------------------------------


def test_disconnect_mid_upload_frees_the_slot_and_the_memory(make_server):
    live = make_server(
        max_concurrency=1, max_body_bytes=512 * MiB, max_inflight_bytes=768 * MiB, warmup=False
    )
    declared = 256 * MiB
    before = rss_bytes()
    sock = open_request(live.url, _head(declared))
    try:
        sock.sendall(b"\0" * MiB)
        adm = _admission(live)
        # Admission reserves the body and its reply (1.5 x) from the headers on...
        assert wait_until(lambda: adm.requests == 1 and adm.bytes == declared * 3 // 2, 10)
        held = rss_bytes()
    finally:
        sock.close()
    assert _idle(live), "the admission slot was not released after the client vanished"
    # ...but memory is committed only as bytes arrive: 1 MiB sent of 256 MiB declared costs about 1 MiB
    # (a buffer zero-filled from Content-Length cost the whole 256 MiB here).
    print(f"\nmid-upload: RSS {before / MiB:.0f} -> {held / MiB:.0f} MiB while connected", end="")
    assert held < before + 64 * MiB, (before, held)
    assert wait_until(lambda: rss_bytes() < before + 64 * MiB, 10), (before, held, rss_bytes())
    served(live.url)  # max_concurrency=1: this also proves the slot is free


def test_disconnect_mid_download_frees_the_slot_and_the_memory(make_server):
    live = make_server(max_concurrency=1, warmup=False)
    groups = make_groups(7, 4 * 1024 * 1024, n_tensors=4)  # 32 MiB body, 16 MiB reply
    body = body_of(groups, SPEC)
    served(live.url)
    before = rss_bytes()
    for _ in range(3):
        sock = open_request(live.url, _head(len(body)))
        try:
            sock.sendall(body)
            sock.settimeout(30)
            got = sock.recv(65536)
            assert got.startswith(b"HTTP/1.1 200"), got[:100]
        finally:
            # RST instead of FIN, so the server's next write fails at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
        assert _idle(live)
    served(live.url, seed=1)
    assert wait_until(lambda: rss_bytes() < before + 96 * MiB, 10), (before, rss_bytes())


def test_half_sent_requests_on_many_connections_all_release(make_server):
    live = make_server(max_concurrency=8, warmup=False)
    socks = []
    try:
        for i in range(8):
            s = open_request(live.url, _head(1 * MiB))
            s.sendall(b"\0" * (1000 * i + 1))
            socks.append(s)
        adm = _admission(live)
        assert wait_until(lambda: adm.requests == 8, 10)
        # Uploads in progress hold no compute slot: the next request is served meanwhile.
        assert adm.computing == 0
        served(live.url, seed=1)
    finally:
        for s in socks:
            s.close()
    assert _idle(live)
    served(live.url)


# ---- slow bodies ---------------------------------------------------------------------------------------


def test_a_slow_body_holds_only_its_own_slot(make_server):
    """A trickling client takes one slot while it is connected; others are served; it frees on disconnect."""
    live = make_server(max_concurrency=2, warmup=False)
    groups = make_groups(3, 2000)
    body = body_of(groups, SPEC)
    sock = open_request(live.url, _head(len(body)))
    try:
        for i in range(0, 40):  # 40 bytes over about 1 s
            sock.sendall(body[i : i + 1])
            time.sleep(0.025)
            if i == 20:
                served(live.url, seed=9)
        assert _admission(live).requests == 1
        sock.sendall(body[40:])  # finishing late is still served, and correctly
        status, _, data = read_response(sock)
        assert status == 200
        check_answer(data, SPEC, groups)
    finally:
        sock.close()
    assert _idle(live)


def test_a_stalled_body_is_cut_off_after_the_body_timeout(make_server):
    """A client that stops sending mid-body gets 400 after `body_timeout_s` and its slot and buffer go."""
    live = make_server(max_concurrency=1, warmup=False, body_timeout_s=1)
    sock = open_request(live.url, _head(64 * MiB))
    try:
        sock.sendall(b"\0" * 1000)
        adm = _admission(live)
        assert wait_until(lambda: adm.requests == 1, 5)
        t0 = time.monotonic()
        status, _, data = read_response(sock, timeout=10)
        waited = time.monotonic() - t0
    finally:
        sock.close()
    assert status == 400, data[:300]
    assert b'"malformed-body"' in data
    assert 0.5 < waited < 5, waited
    assert _idle(live, timeout=5)
    served(live.url)


def test_a_trickled_body_is_cut_off_by_the_minimum_rate(make_server):
    """Every byte re-arms an idle timeout, so trickling needs a floor on the rate: a body must arrive within
    `body_timeout_s` plus its size at `body_min_rate`. 1,500 bytes at 1,000 B/s get 1 + 1.5 s; one byte per
    0.4 s is dropped then."""
    live = make_server(max_concurrency=1, warmup=False, body_timeout_s=1, body_min_rate=1000)
    sock = open_request(live.url, _head(1500))
    adm = _admission(live)
    t0 = time.monotonic()
    try:
        assert wait_until(lambda: adm.requests == 1, 5, step=0.02)
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end and adm.requests:  # bounded: at most 5 s, about 12 bytes
            with contextlib.suppress(OSError):
                sock.sendall(b"\0")
            time.sleep(0.4)
        assert adm.requests == 0, "a 2.5 bytes/s upload still holds its slot after 5 s"
        cut = time.monotonic() - t0
        status, _, data = read_response(sock, timeout=5)
    finally:
        sock.close()
    assert status == 400, data[:300]
    assert b'"malformed-body"' in data
    assert cut < 4, cut
    assert _idle(live, timeout=5)
    served(live.url)


# ---- device out of memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_is_503_and_the_next_request_succeeds(live_server, monkeypatch, error):
    def oom(*args: object, **kwargs: object) -> None:
        raise error("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)")

    monkeypatch.setattr(combine, "run", oom)
    groups = make_groups(2, 1000)
    resp = httpx.post(
        live_server.url + "/v1/combine", content=body_of(groups, SPEC), headers=OCTET, timeout=30
    )
    assert problem(resp, [503])["code"] == "device-out-of-memory"
    assert resp.headers.get("x-request-id")
    assert _idle(live_server)
    monkeypatch.undo()
    served(live_server.url)


def test_client_retries_through_a_transient_oom(live_server, monkeypatch):
    import gradweight
    from gradweight.retry import Retry

    real = combine.run
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(combine, "run", flaky)
    groups = make_groups(4, 3000)
    with gradweight.Client(
        live_server.url, retries=Retry(attempts=5, backoff=0.01, max_backoff=0.05), timeout=60
    ) as client:
        result = client.combine(forget=groups["forget"], retain=groups["retain"], method="munba")
    assert calls["n"] == 3
    from rel_util import reference

    want, _ = reference(SPEC, groups)
    torch.testing.assert_close(torch.as_tensor(result.scaled_grad), want, rtol=1e-4, atol=1e-5)


# ---- SIGTERM -------------------------------------------------------------------------------------------


def _inflight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(r"^gradweight_inflight_requests (\S+)$", text, re.M)
    return float(m.group(1)) if m else -1.0


def _refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


def test_sigterm_lets_the_inflight_request_finish_and_refuses_new_ones():
    groups = make_groups(6, 200_000)
    body = body_of(groups, SPEC)
    with subprocess_server() as (proc, url):
        sock = open_request(url, _head(len(body)))
        try:
            sock.sendall(body[: len(body) // 2])
            assert wait_until(lambda: _inflight(url) == 1, 10, step=0.05), "request not admitted"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: _refused(url), 5, step=0.05), (
                "new connections still accepted after SIGTERM"
            )
            assert proc.poll() is None, "the server exited with a request in flight"
            sock.sendall(body[len(body) // 2 :])
            status, _, data = read_response(sock, timeout=30)
        finally:
            sock.close()
        assert status == 200, data[:300]
        check_answer(data, SPEC, groups)
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit too.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 15


def test_sigterm_shutdown_is_bounded_even_with_a_stalled_client():
    """`shutdown_timeout_s` bounds the graceful shutdown: a stalled upload cannot keep the process alive."""
    with subprocess_server({"GRADWEIGHT_SHUTDOWN_TIMEOUT_S": "2", "GRADWEIGHT_BODY_TIMEOUT_S": "60"}) as (
        proc,
        url,
    ):
        sock = open_request(url, _head(1 * MiB))
        try:
            sock.sendall(b"\0" * 100)
            assert wait_until(lambda: _inflight(url) == 1, 10, step=0.05)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pytest.fail("still running 8 s after SIGTERM with one stalled upload")
            assert time.monotonic() - t0 < 6
        finally:
            sock.close()


def test_the_shared_server_is_still_alive(live_server):
    alive(live_server.url)
    served(live_server.url, seed=42)
