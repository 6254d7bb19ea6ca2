"""Client benchmark: `Client.combine` against a bare socket client on the same server, same bytes.

A `gradweight-server` subprocess (CPU) serves every case; the inputs are two groups of `--numel` float32
parameters in 100 torch tensors, method `simple`. Interleaved, `--repeat` times each:
- `bare`: the request body prebuilt as bytes, sent over a plain socket and received into a reused buffer
  (bench/service.py's HTTPClient): the transport ceiling of a Python client;
- `combine`: `Client.combine(f, r, "simple")`, streamed upload, checked reply (shapes, dtype, weights and
  the NaN/infinity scan of the vector);
- `gram`: `Client.combine(..., mode="gram")` (local gram, /v1/weights, local sum);
- `unscanned`: `combine` with the reply's NaN/infinity scan switched off.
It prints median wall seconds, the ratio to `bare` and the client process's CPU seconds; the scan's
cost (CPU of combine - unscanned, steadier than wall time on a shared machine) as a share of `combine`;
and each mode's client peak extra memory (VmHWM over VmRSS once the inputs exist, in a fresh process per
mode) as a multiple of the result's size.

    .venv/bin/python bench/client.py [--numel 5e7] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import unittest.mock
from collections.abc import Callable
from typing import Any

from gradweight.types import Mode

from service import HTTPClient, free_port, rss, wait_ready

N_TENSORS = 100


def inputs(numel: int) -> tuple[list[Any], list[Any]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    sizes = [numel // N_TENSORS] * N_TENSORS
    sizes[-1] += numel - sum(sizes)
    f = [torch.randn(s, generator=gen) for s in sizes]
    r = [torch.randn(s, generator=gen) - 0.3 * x for s, x in zip(sizes, f)]
    return f, r


def memory(url: str, numel: int, mode: Mode) -> float:
    """In this (fresh) process: peak extra memory of one call over the result's size."""
    import gradweight

    f, r = inputs(numel)
    with gradweight.Client(url) as c:
        c.combine(f[:1], r[:1], "simple", mode=mode)  # imports, connection, first-use allocations
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        before = rss(os.getpid(), "VmRSS")
        res = c.combine(f, r, "simple", mode=mode)
        peak = rss(os.getpid(), "VmHWM")
    assert res.scaled_grad is not None
    return float((peak - before) / (res.scaled_grad.numel() * 4))


def _finite(data: memoryview, tag: str) -> bool:
    return True


def unscanned(c: Any, f: list[Any], r: list[Any]) -> None:
    """`combine` with the reply's NaN/infinity scan switched off: what the scan costs."""
    with unittest.mock.patch("gradweight.sink.all_finite", new=_finite):
        c.combine(f, r, "simple")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=float, default=5e7, help="parameters per group")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--memory", nargs=2, metavar=("URL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    numel = int(args.numel)
    if args.memory:
        print(memory(args.memory[0], numel, "gram" if args.memory[1] == "gram" else "full"))
        return

    import gradweight
    from gradweight.encoding import combine_body
    from gradweight.tensors import as_group

    port = free_port()
    env = dict(
        os.environ,
        GRADWEIGHT_DEVICE="cpu",
        GRADWEIGHT_PORT=str(port),
        GRADWEIGHT_MAX_BODY_BYTES=str(4 << 30),
        GRADWEIGHT_MAX_INFLIGHT_BYTES=str(8 << 30),
    )
    server = subprocess.Popen([sys.executable, "-m", "gradweight_server.main"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/readyz", server)
        f, r = inputs(numel)
        groups = {"forget": as_group(f, "forget"), "retain": as_group(r, "retain")}
        body = combine_body(groups, method={"name": "simple"}).to_bytes()
        reused = bytearray(1 << 16)

        def bare() -> None:
            """A fresh connection each time (the server closes idle ones after 5 s), the buffer reused."""
            nonlocal reused
            sock = HTTPClient(port)
            sock.buf = reused
            sock.post("/v1/combine?layout=flat", body)
            reused = sock.buf
            sock.close()

        times: dict[str, list[float]] = {"bare": [], "combine": [], "gram": [], "unscanned": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        with gradweight.Client(url) as c:
            cases: dict[str, Callable[[], object]] = {
                "bare": bare,
                "combine": lambda: c.combine(f, r, "simple"),
                "gram": lambda: c.combine(f, r, "simple", mode="gram"),
                "unscanned": lambda: unscanned(c, f, r),
            }
            for fn in cases.values():
                fn()  # warm
            for _ in range(args.repeat):
                for name, fn in cases.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            res = c.combine(f, r, "simple")
        assert res.scaled_grad is not None
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        mb_up, mb_down = len(body) / 1e6, res.scaled_grad.numel() * 4 / 1e6
        print(f"{numel:,} float32 parameters per group: {mb_up:.0f} MB up, {mb_down:.0f} MB down")
        print(f"median of {args.repeat} interleaved runs")
        print(f"  {'case':>9}  {'wall':>7}  {'vs bare':>7}  {'client CPU':>10}")
        for name, secs in med.items():
            print(f"  {name:>9}  {secs:6.3f}s  {secs / med['bare']:6.2f}x  {med_cpu[name]:9.3f}s")
        scan = med_cpu["combine"] - med_cpu["unscanned"]
        print(
            f"  NaN/inf scan of the result: {scan * 1e3:.0f} ms of client CPU, "
            f"{scan / med['combine']:.1%} of combine's wall time"
        )
        for mode in ("full", "gram"):
            out = subprocess.run(
                [sys.executable, __file__, "--numel", str(numel), "--memory", url, mode],
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"  client peak extra memory, mode={mode}: {float(out.stdout):.2f}x the result")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
