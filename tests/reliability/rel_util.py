"""Shared helpers of the reliability tests: bodies, the engine reference, problem checks, RSS, raw sockets.

Every socket here goes to 127.0.0.1 and every wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import safetensors.torch as st
import torch
from gradweight.methods import parse_method
from gradweight_server.engine import run

ROOT = Path(__file__).resolve().parents[2]
OCTET = {"content-type": "application/octet-stream"}
METHODS: tuple[dict[str, Any], ...] = (
    {"name": "munba"},
    {"name": "nash"},
    {"name": "simple", "forget_weight": 0.7, "retain_weight": -1.5},
    {"name": "none"},
)
# Things an error body must never show: a stack trace, a source path, an exception repr.
LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|/work/|/home/|/usr/|0x[0-9a-f]{6,}|<[a-zA-Z_.]+ object"
)


def make_groups(
    seed: int, numel: int, n_tensors: int = 3, dtype: torch.dtype = torch.float32
) -> dict[str, list[torch.Tensor]]:
    """`retain` and `forget`, each `n_tensors` tensors of `numel` elements in all; never collinear."""
    gen = torch.Generator().manual_seed(seed)
    n_tensors = max(1, min(n_tensors, numel))
    sizes = [numel // n_tensors] * n_tensors
    sizes[-1] += numel - sum(sizes)
    forget = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    retain = [(torch.randn(s, generator=gen) - 0.3 * f.float()).to(dtype) for s, f in zip(sizes, forget)]
    return {"retain": retain, "forget": forget}


def body_of(groups: Mapping[str, Sequence[torch.Tensor]], spec: Mapping[str, Any] | None = None) -> bytes:
    tensors = {f"{g}/{i}": t.contiguous() for g, ts in groups.items() for i, t in enumerate(ts)}
    meta = {"method": json.dumps(spec)} if spec is not None else None
    return st.save(tensors, metadata=meta)


def reference(
    spec: Mapping[str, Any], groups: Mapping[str, Sequence[torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The in-process engine's answer for the same request."""
    method = parse_method(dict(spec))
    used = {g: list(ts) for g, ts in groups.items() if method.name != "none" or g == "forget"}
    n = len(next(iter(groups.values())))
    outcome = run(method, used, keys=[str(i) for i in range(n)])
    return outcome.flat, outcome.weights


def reply_tensor(content: bytes) -> tuple[torch.Tensor, dict[str, str]]:
    (n,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    return st.load(content)["scaled_grad"], meta


def check_answer(
    content: bytes, spec: Mapping[str, Any], groups: Mapping[str, Sequence[torch.Tensor]]
) -> None:
    got, meta = reply_tensor(content)
    want, weights = reference(spec, groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-5)
    got_w = json.loads(meta["weights"])
    for g, w in weights.items():
        assert abs(got_w[g] - w) <= 1e-6 * max(1.0, abs(w)), (got_w, weights)


def served(url: str, seed: int = 0, numel: int = 5000, spec: Mapping[str, Any] | None = None) -> None:
    """One combine of fresh random groups, answered 200 and correctly."""
    spec = spec or {"name": "munba"}
    groups = make_groups(seed, numel)
    resp = httpx.post(url + "/v1/combine", content=body_of(groups, spec), headers=OCTET, timeout=60)
    assert resp.status_code == 200, resp.text[:300]
    check_answer(resp.content, spec, groups)


def problem(resp: httpx.Response, statuses: Sequence[int] | None = None) -> dict[str, Any]:
    """A well-formed RFC 9457 problem that leaks nothing; optionally one of `statuses`."""
    assert resp.status_code >= 400, resp.status_code
    if statuses is not None:
        assert resp.status_code in statuses, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.text[:500]
    body: dict[str, Any] = resp.json()
    assert set(body) >= {"type", "title", "status", "detail", "code"}, body
    assert body["status"] == resp.status_code
    assert not LEAKS.search(resp.text), resp.text[:500]
    return body


def client_error(resp: httpx.Response) -> dict[str, Any]:
    """Hostile input must be refused as a 4xx problem, never a 5xx."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    return problem(resp)


def alive(url: str) -> None:
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of `pid` (default: this process) from /proc, in bytes."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def open_request(url: str, head: str, timeout: float = 10.0) -> socket.socket:
    """A connection with the request line and headers sent and no body yet."""
    host, port = url.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(head.encode("latin-1") + b"\r\n\r\n")
    return sock


def read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with Content-Length from `sock` (bounded by `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or time.monotonic() > deadline:
            raise ConnectionError(f"connection closed before the response head ({data[:200]!r})")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(1 << 20)
        if not chunk or time.monotonic() > deadline:
            raise ConnectionError("connection closed mid-body")
        rest += chunk
    return status, headers, rest[:length]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_bin() -> str:
    exe = Path(sys.executable).with_name("gradweight-server")
    return str(exe) if exe.exists() else str(ROOT / ".venv" / "bin" / "gradweight-server")


@contextlib.contextmanager
def subprocess_server(
    env_extra: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`gradweight-server --device cpu` as a child process on a free loopback port; yields (proc, url)."""
    port = free_port()
    env = {**os.environ, "GRADWEIGHT_LOG_LEVEL": "warning", **(env_extra or {})}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(
            [server_bin(), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "subprocess server not ready within 90 s"
                time.sleep(0.1)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
