"""What the connection guards cost: uvicorn's plain httptools protocol against `GuardedProtocol`.

The same app is served both ways (a fresh subprocess each, `--device cpu`) and driven from one raw
keep-alive socket: small `GET /healthz` requests (where per-request overhead shows), and an octet-stream
combine of about 64 MB up and 32 MB down (where per-read overhead shows). Prints the median of `--repeat`
rounds for each.

    .venv/bin/python bench/guard.py [--requests 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import safetensors.torch as st
import torch


def serve(kind: str, port: int) -> None:
    import uvicorn
    from gradweight_server.app import create_app
    from gradweight_server.main import server_config
    from gradweight_server.settings import Settings

    settings = Settings(device="cpu", port=port, log_level="warning")
    app = create_app(settings)
    overrides = {"http": "httptools"} if kind == "plain" else {}
    uvicorn.Server(server_config(app, settings, **overrides)).run()


def _read_reply(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(1 << 20)
    return length


def small_requests(port: int, n: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        req = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        t0 = time.perf_counter()
        for _ in range(n):
            sock.sendall(req)
            _read_reply(sock)
        return n / (time.perf_counter() - t0)


def big_request(port: int, body: bytes) -> float:
    head = (
        "POST /v1/combine?method=munba HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.perf_counter()
        sock.sendall(head + body)
        _read_reply(sock)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--order", nargs="+", default=["plain", "guarded", "plain", "guarded"])
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"{g}/{i}": torch.randn(80_000, generator=gen) for g in ("retain", "forget") for i in range(100)
    }
    body = st.save(tensors)
    print(f"{'protocol':>9} {'GET /healthz req/s':>19} {'64 MB combine s':>16}")
    for kind in args.order:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, GRADWEIGHT_MAX_BODY_BYTES=str(1 << 30))
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)], env=env)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready")
                time.sleep(0.1)
            big_request(port, body)
            rates = [small_requests(port, args.requests) for _ in range(args.repeat)]
            times = [big_request(port, body) for _ in range(args.repeat)]
            print(f"{kind:>9} {statistics.median(rates):>19,.0f} {statistics.median(times):>16.3f}")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
