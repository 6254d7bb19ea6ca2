"""Service benchmark: our server against the transport ceiling, the in-process engine and a naive server.

For 1M, 10M and 50M float32 parameters per group (about 100 tensors per group), in one run:
- `ours`: gradweight-server (uvicorn, uvloop, httptools) driven by a plain socket client, keep-alive;
- `raw`: the same request and response bytes over a bare loopback socket (the transport ceiling);
- `engine`: the in-process engine on tensors already in memory (no transport);
- `naive`: the FastAPI server a user would write first (`await request.body()`, `safetensors.torch.load`,
  the same engine, `safetensors.torch.save`).
It prints median round-trip seconds, GB/s ((request + response bytes) / time) and, for both servers,
peak server memory per request byte over idle (VmHWM minus VmRSS before the first request, in a fresh
server process per size).

    .venv/bin/python bench/service.py [--sizes 1e6 1e7 5e7] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response

# Before torch loads OpenMP, as the server does (see gradweight_server/__init__.py), so the in-process
# engine row is measured under the same threading policy as the server.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

N_TENSORS = 100
SPEC = {"name": "munba"}


def make_body(numel: int) -> bytes:
    import safetensors.torch as st
    import torch

    gen = torch.Generator().manual_seed(0)
    sizes = [numel // N_TENSORS] * N_TENSORS
    sizes[-1] += numel - sum(sizes)
    tensors = {}
    for i, s in enumerate(sizes):
        f = torch.randn(s, generator=gen)
        tensors[f"forget/{i}"] = f
        tensors[f"retain/{i}"] = torch.randn(s, generator=gen) - 0.3 * f
    body: bytes = st.save(tensors, metadata={"method": json.dumps(SPEC)})
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server not ready")


class HTTPClient:
    """Keep-alive HTTP/1.1 over one socket; the response is received into a reused buffer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(1 << 16)

    def post(self, path: str, body: bytes) -> memoryview:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head)
        self.sock.sendall(body)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            got += chunk
        head_raw, rest = got.split(b"\r\n\r\n", 1)
        status = int(head_raw.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head_raw.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        if len(self.buf) < length:
            self.buf = bytearray(length)
        view = memoryview(self.buf)
        view[: len(rest)] = rest
        pos = len(rest)
        while pos < length:
            n = self.sock.recv_into(view[pos:length])
            if not n:
                raise RuntimeError("connection closed")
            pos += n
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {bytes(view[:length])[:300]!r}")
        return view[:length]

    def close(self) -> None:
        self.sock.close()


def timed(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_server(
    cmd: list[str], env: dict[str, str], body: bytes, repeat: int, port: int
) -> tuple[float, float, int]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        idle = rss(proc.pid, "VmRSS")
        client = HTTPClient(port)
        reply_len = len(client.post("/v1/combine", body))
        secs = timed(lambda: client.post("/v1/combine", body), repeat)
        client.close()
        peak = rss(proc.pid, "VmHWM")
        return secs, (peak - idle) / len(body), reply_len
    finally:
        proc.terminate()
        proc.wait(30)


def bench_raw(body: bytes, reply_len: int, repeat: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-raw", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        buf = bytearray(reply_len)

        def once() -> None:
            sock.sendall(len(body).to_bytes(8, "little") + reply_len.to_bytes(8, "little"))
            sock.sendall(body)
            view, pos = memoryview(buf), 0
            while pos < reply_len:
                pos += sock.recv_into(view[pos:])

        secs = timed(once, repeat)
        sock.close()
        return secs
    finally:
        proc.terminate()
        proc.wait(30)


def serve_raw(port: int) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    conn, _ = srv.accept()
    buf, out = bytearray(), bytearray()
    while True:
        head = conn.recv(16, socket.MSG_WAITALL)
        if len(head) < 16:
            return
        n, m = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
        if len(buf) < n:
            buf = bytearray(n)
        view, pos = memoryview(buf), 0
        while pos < n:
            pos += conn.recv_into(view[pos:n])
        if len(out) != m:
            out = bytearray(m)
        conn.sendall(out)


def naive_app() -> FastAPI:
    import safetensors.torch as st
    from gradweight.methods import parse_method
    from gradweight_server.engine import run

    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/combine")
    async def combine(request: Request) -> Response:
        tensors = st.load(await request.body())
        n = len(tensors) // 2
        groups = {g: [tensors[f"{g}/{i}"] for i in range(n)] for g in ("retain", "forget")}
        outcome = run(parse_method(SPEC), groups)
        return Response(st.save({"scaled_grad": outcome.flat}), media_type="application/octet-stream")

    return app


def bench_engine(body: bytes, repeat: int) -> float:
    import torch
    from gradweight.methods import parse_method
    from gradweight_server.decode import parse_safetensors
    from gradweight_server.engine import run
    from gradweight_server.views import assemble

    data = assemble(
        parse_safetensors(bytearray(body), max_header=1 << 26, max_tensors=1 << 20), torch.device("cpu")
    )
    out = torch.empty(data.numel)
    spec = parse_method(SPEC)
    return timed(lambda: run(spec, data.groups, keys=data.keys, out=out), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 5e7])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--serve-raw", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-naive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        serve_raw(args.serve_raw)
        return
    if args.serve_naive:
        import uvicorn

        uvicorn.run(
            naive_app(),
            host="127.0.0.1",
            port=args.serve_naive,
            loop="uvloop",
            http="httptools",
            log_level="warning",
        )
        return
    rows = []
    print(f"{'params/group':>12} {'case':>7} {'seconds':>8} {'GB/s':>6} {'B/B':>5} {'vs naive':>8}")
    for size in args.sizes:
        numel = int(size)
        body = make_body(numel)
        env = dict(
            os.environ,
            GRADWEIGHT_DEVICE="cpu",
            GRADWEIGHT_MAX_BODY_BYTES=str(4 << 30),
            GRADWEIGHT_MAX_INFLIGHT_BYTES=str(8 << 30),
        )
        port = free_port()
        env["GRADWEIGHT_PORT"] = str(port)
        ours = bench_server([sys.executable, "-m", "gradweight_server.main"], env, body, args.repeat, port)
        port = free_port()
        naive = bench_server(
            [sys.executable, __file__, "--serve-naive", str(port)], env, body, args.repeat, port
        )
        raw = bench_raw(body, ours[2], args.repeat)
        engine = bench_engine(body, args.repeat)
        moved = len(body) + ours[2]
        cases = {
            "ours": (ours[0], ours[1]),
            "naive": (naive[0], naive[1]),
            "raw": (raw, None),
            "engine": (engine, None),
        }
        for name, (secs, bpb) in cases.items():
            row = {
                "params_per_group": numel,
                "case": name,
                "seconds": secs,
                "gb_per_s": moved / secs / 1e9,
                "bytes_per_request_byte": bpb,
                "speedup_vs_naive": naive[0] / secs,
            }
            rows.append(row)
            print(
                f"{numel:>12,} {name:>7} {secs:>8.3f} {row['gb_per_s']:>6.2f} "
                f"{'' if bpb is None else f'{bpb:.2f}':>5} {row['speedup_vs_naive']:>7.2f}x"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
