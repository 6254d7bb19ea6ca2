"""Service benchmark: our server against the transport floor, the in-process engine and a naive server.

Cases: the LoRA step our users send (`--lora`, on by default: 256 tensors of an SD 1.5 UNet's LoRA at rank
5, 996,480 parameters per group), then 1M, 10M and 50M float32 parameters per group in `--tensors` (100)
tensors. Bodies are laid out as gradweight's client sends them (each group's tensors back to back, in key
order). In one run per case:
- `ours`: gradweight-server (uvicorn, uvloop, httptools) driven by a plain socket client, keep-alive;
- `raw`: the same request and response bytes over a bare loopback socket (the transport floor);
- `engine`: the in-process engine on tensors already in memory (no transport);
- `naive`: the FastAPI server a user would write first (`await request.body()`, `safetensors.torch.load`,
  the same engine, `safetensors.torch.save`).
It prints median round-trip seconds, GB/s ((request + response bytes) / time), each row's ratio to the
floor and, for both servers, peak server memory per request byte over idle (VmHWM minus VmRSS after one
tiny request, whose one-off costs of a fresh process are not per byte; a fresh server process per case);
then where `ours` spends a request, from the reply's `timing` (receive, decode, compute, encode; the rest
is routing and the reply's send). `cores` is the CPU time of client and server together per request over
its wall time: how many of the machine's cores the round trip keeps busy (what an overlap of compute and
transfer could use is what is left idle).

    .venv/bin/python bench/service.py [--sizes 1e6 1e7 5e7] [--tensors 100] [--no-lora] [--repeat 5]
                                      [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import gradweight_server  # noqa: F401  # the OpenMP wait policy before torch loads (engine row too)
from fastapi import FastAPI, Request, Response

N_TENSORS = 100
SPEC = {"name": "munba"}


def sizes_of(numel: int, n_tensors: int) -> list[int]:
    sizes = [numel // n_tensors] * n_tensors
    sizes[-1] += numel - sum(sizes)
    return sizes


def make_body(sizes: list[int]) -> bytes:
    """A /v1/combine body as gradweight's client lays it out: forget's tensors, then retain's, in order."""
    import torch
    from gradweight.wire import build_header

    gen = torch.Generator().manual_seed(0)
    forget = [torch.randn(n, generator=gen) for n in sizes]
    retain = [torch.randn(n, generator=gen) - 0.3 * f for f, n in zip(forget, sizes)]
    entries = [(f"{g}/{i}", "F32", (n,)) for g in ("forget", "retain") for i, n in enumerate(sizes)]
    header, _ = build_header(entries, {"method": json.dumps(SPEC)})
    return header + b"".join(t.numpy().tobytes() for t in forget + retain)


def lora_sizes(rank: int = 5) -> list[int]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from trainer import lora_shapes

    return [a * b for a, b in lora_shapes(rank)]


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


def cpu_s(pid: int | None = None) -> float:
    """User plus system CPU seconds so far of process `pid`, or of this one."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_cpu(fn: Callable[[], Any], repeat: int, pid: int) -> tuple[float, float]:
    """(median seconds, CPU seconds per call of this process and `pid` together)."""
    before = cpu_s() + cpu_s(pid)
    secs = timed(fn, repeat)
    return secs, (cpu_s() + cpu_s(pid) - before) / (repeat + 1)


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

    def post(self, path: str, body: bytes, media: str = "application/octet-stream") -> memoryview:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {media}\r\n"
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


def reply_timing(reply: memoryview) -> dict[str, float]:
    n = int.from_bytes(reply[:8], "little")
    timing: dict[str, float] = json.loads(json.loads(bytes(reply[8 : 8 + n]))["__metadata__"]["timing"])
    return timing


@contextlib.contextmanager
def serving(cmd: list[str], env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess, ready on 127.0.0.1:`port`, stopped on exit."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def bench_server(
    cmd: list[str], env: dict[str, str], body: bytes, repeat: int, port: int, stages: bool = False
) -> tuple[float, float, int, dict[str, float], float]:
    """(median seconds, peak bytes per request byte, reply length, median stage milliseconds, CPU seconds
    per request of client and server)."""
    with serving(cmd, env, port) as proc:
        client = HTTPClient(port)
        client.post("/v1/combine", make_body([1, 1]))  # the first request's one-off costs are not per byte
        idle = rss(proc.pid, "VmRSS")
        reply_len = len(client.post("/v1/combine", body))
        seen: list[dict[str, float]] = []

        def once() -> None:
            reply = client.post("/v1/combine", body)
            if stages:
                seen.append(reply_timing(reply))

        secs, cpu = timed_cpu(once, repeat, proc.pid)
        client.close()
        peak = rss(proc.pid, "VmHWM")
    median = {k: statistics.median(t[k] for t in seen) for k in seen[0]} if seen else {}
    return secs, (peak - idle) / len(body), reply_len, median, cpu


def fixed_costs(repeat: int) -> dict[str, float]:
    """Median milliseconds of the smallest requests (two one-element tensors per group, a 2 x 2 gram)
    against the same bytes over a bare socket: what a request costs beyond its bytes."""
    port = free_port()
    env = dict(os.environ, GRADWEIGHT_DEVICE="cpu", GRADWEIGHT_PORT=str(port))
    tiny = make_body([1, 1])  # two tensors of one element: munba needs two directions
    gram = json.dumps({"method": SPEC, "gram": [[2.0, -0.5], [-0.5, 1.0]]}).encode()
    with serving([sys.executable, "-m", "gradweight_server.main"], env, port):
        client = HTTPClient(port)
        combine = timed(lambda: client.post("/v1/combine", tiny), repeat) * 1e3
        weights = timed(lambda: client.post("/v1/weights", gram, "application/json"), repeat) * 1e3
        reply = len(client.post("/v1/combine", tiny))
        client.close()
    return {"combine": combine, "weights": weights, "raw": bench_raw(tiny, reply, repeat)[0] * 1e3}


def bench_raw(body: bytes, reply_len: int, repeat: int) -> tuple[float, float]:
    """(median seconds, CPU seconds per round trip of both ends)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-raw", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

        result = timed_cpu(once, repeat, proc.pid)
        sock.close()
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def serve_raw(port: int) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def bench_engine(body: bytes, repeat: int) -> tuple[float, float]:
    import torch
    from gradweight.methods import parse_method
    from gradweight_server.decode import parse_safetensors
    from gradweight_server.engine import run
    from gradweight_server.runtime import PARALLEL_FROM
    from gradweight_server.views import assemble

    data = assemble(
        parse_safetensors(bytearray(body), max_header=1 << 26, max_tensors=1 << 20), torch.device("cpu")
    )
    out = torch.empty(data.numel)
    spec = parse_method(SPEC)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if len(body) < PARALLEL_FROM else threads)  # as the server's compute thread
    before = cpu_s()
    secs = timed(lambda: run(spec, data.groups, keys=data.keys, out=out), repeat)
    cpu = (cpu_s() - before) / (repeat + 1)
    torch.set_num_threads(threads)
    return secs, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="*", type=float, default=[1e6, 1e7, 5e7])
    parser.add_argument("--tensors", type=int, default=N_TENSORS, help="tensors per group")
    parser.add_argument("--no-lora", dest="lora", action="store_false", help="skip the LoRA-shaped case")
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
    cases = [(f"{len(lora_sizes())} LoRA", lora_sizes())] if args.lora else []
    cases += [(f"{args.tensors} tensors", sizes_of(int(size), args.tensors)) for size in args.sizes]
    rows = []
    profiles = []
    print(
        f"{'params/group':>12} {'layout':>12} {'case':>7} {'seconds':>8} {'GB/s':>6} {'x floor':>7} "
        f"{'B/B':>5} {'vs naive':>8} {'cores':>5}"
    )
    for layout, sizes in cases:
        numel = sum(sizes)
        body = make_body(sizes)
        env = dict(
            os.environ,
            GRADWEIGHT_DEVICE="cpu",
            GRADWEIGHT_MAX_BODY_BYTES=str(4 << 30),
            GRADWEIGHT_MAX_INFLIGHT_BYTES=str(8 << 30),
        )
        port = free_port()
        env["GRADWEIGHT_PORT"] = str(port)
        cmd = [sys.executable, "-m", "gradweight_server.main"]
        ours = bench_server(cmd, env, body, args.repeat, port, stages=True)
        port = free_port()
        naive = bench_server(
            [sys.executable, __file__, "--serve-naive", str(port)], env, body, args.repeat, port
        )
        raw, raw_cpu = bench_raw(body, ours[2], args.repeat)
        engine, engine_cpu = bench_engine(body, args.repeat)
        moved = len(body) + ours[2]
        cases_ = {
            "ours": (ours[0], ours[1], ours[4]),
            "naive": (naive[0], naive[1], naive[4]),
            "raw": (raw, None, raw_cpu),
            "engine": (engine, None, engine_cpu),
        }
        for name, (secs, bpb, cpu) in cases_.items():
            row = {
                "params_per_group": numel,
                "layout": layout,
                "case": name,
                "seconds": secs,
                "gb_per_s": moved / secs / 1e9,
                "x_floor": secs / raw,
                "bytes_per_request_byte": bpb,
                "speedup_vs_naive": naive[0] / secs,
                "cpu_seconds": cpu,
            }
            rows.append(row)
            print(
                f"{numel:>12,} {layout:>12} {name:>7} {secs:>8.4f} {row['gb_per_s']:>6.2f} "
                f"{row['x_floor']:>6.2f}x {'' if bpb is None else f'{bpb:.2f}':>5} "
                f"{row['speedup_vs_naive']:>7.2f}x {cpu / secs:>5.2f}"
            )
        profiles.append((numel, layout, ours[0], ours[3]))
    print("\nwhere `ours` spends a request (median ms; rest = routing, reply header and send):")
    print(
        f"{'params/group':>12} {'layout':>12} {'total':>8} {'receive':>8} {'decode':>8} {'compute':>8} "
        f"{'encode':>8} {'rest':>8}"
    )
    for numel, layout, secs, t in profiles:
        total = secs * 1e3
        parts = [t.get(f"{k}_ms", 0.0) for k in ("receive", "decode", "compute", "encode")]
        print(
            f"{numel:>12,} {layout:>12} {total:>8.1f} "
            + " ".join(f"{v:>8.1f}" for v in parts)
            + f" {total - sum(parts):>8.1f}"
        )
    fixed = fixed_costs(max(50, args.repeat * 20))
    print(
        f"\nfixed cost (median ms of the smallest requests; raw = their bytes over a bare socket): "
        f"/v1/combine {fixed['combine']:.2f}, /v1/weights {fixed['weights']:.2f}, raw {fixed['raw']:.2f}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
