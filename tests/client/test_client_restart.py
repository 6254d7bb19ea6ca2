"""A default client rides through a server restart: the process is SIGKILLed mid-session and started
again on the same port, and a call made in between succeeds, with the right answer, once it is back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from gradweight import Client

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(port: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("gradweight-server")
    env = {**os.environ, "GRADWEIGHT_LOG_LEVEL": "warning", "GRADWEIGHT_WARMUP": "false"}
    return subprocess.Popen(
        [str(exe), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server was not ready within 90 s")


def test_default_client_rides_through_a_restart(rng: np.random.Generator) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    f = [rng.standard_normal((300, 200)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    r = [rng.standard_normal((300, 200)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    want = np.concatenate([a.reshape(-1) for a in f]) + 0.5 * np.concatenate([a.reshape(-1) for a in r])
    spec = {"name": "simple", "retain_weight": 0.5}
    procs = [_start(port)]
    try:
        _wait_ready(url, procs[0])
        with Client(url) as c:
            np.testing.assert_allclose(c.combine(f, r, spec).scaled_grad, want, rtol=1e-6)  # keep-alive open
            procs[0].kill()
            procs[0].wait(timeout=10)
            out: dict[str, Any] = {}

            def call() -> None:
                t0 = time.monotonic()
                try:
                    out["result"] = c.combine(f, r, spec)
                except Exception as exc:  # reported below
                    out["error"] = exc
                out["seconds"] = time.monotonic() - t0

            worker = threading.Thread(target=call)
            worker.start()
            time.sleep(1.0)  # the call meets a dead connection, then refused ones
            procs.append(_start(port))  # restarted on the same port 1 s after the kill
            worker.join(timeout=90)
        assert not worker.is_alive()
        assert "error" not in out, out.get("error")
        assert out["seconds"] >= 1.0
        np.testing.assert_allclose(out["result"].scaled_grad, want, rtol=1e-6)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
