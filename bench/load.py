"""Loopback load benchmark: concurrent clients against a `gradweight-server` subprocess, every answer checked.

It starts the server on a free 127.0.0.1 port (or uses `--url`, which must be loopback), runs a warm-up
phase, reads the server's RSS, runs the measured phase (by default 16 clients x 50 requests, so 1,000
requests in all with the 200 of the warm-up), reads the RSS again and prints throughput, p50/p99 latency,
errors and RSS growth. Each client is a `gradweight.Client` without retries, so any 503 counts as an error.

Sizes are mixed from 4 KB to 40 MB of request body, log-uniformly, and methods cycle through
munba/nash/simple/none. `--mix trainer` (default) gives each client one size and method for all its
requests, as a trainer sends the same gradients' shape every step; `--mix request` draws a new size per
request (the harder case for the server's same-size buffer reuse). Every answer is compared with the
in-process engine (`gradweight_server.engine.run`) on the same inputs.

    .venv/bin/python bench/load.py [--clients 16] [--requests 50] [--warmup 200] [--mix trainer|request]
        [--min-bytes 4096] [--max-bytes 40e6] [--device cpu] [--max-concurrency 16] [--env K=V ...]
        [--json out.json] [--time-limit 1800]

Every loop is bounded in count, and the whole run by --time-limit seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import torch

METHODS: tuple[dict[str, Any], ...] = (
    {"name": "munba"},
    {"name": "nash"},
    {"name": "simple", "forget_weight": 0.7, "retain_weight": -1.5},
    {"name": "none"},
)
MiB = 1024 * 1024


@dataclass(frozen=True)
class Job:
    seed: int
    body_bytes: int
    n_tensors: int
    method: dict[str, Any]

    @property
    def numel(self) -> int:
        """float32 elements per group: two groups of 4-byte floats fill the body (headers aside)."""
        return max(self.n_tensors, self.body_bytes // 8)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    body_bytes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    mismatches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def plan(clients: int, per_client: int, phase: int, mix: str, lo: float, hi: float) -> list[list[Job]]:
    """Deterministic jobs: `jobs[c]` is client c's list; trainer mix fixes size and method per client."""
    out = []
    for c in range(clients):
        base = random.Random(10_007 * c + 17)
        trainer_size = int(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * c / max(1, clients - 1)))
        trainer_method = METHODS[c % len(METHODS)]
        trainer_tensors = base.randint(1, 8)
        jobs = []
        for i in range(per_client):
            rng = random.Random(1_000_003 * phase + 1_009 * c + i)
            if mix == "trainer":
                jobs.append(Job(rng.randrange(2**31), trainer_size, trainer_tensors, trainer_method))
            else:
                size = log_uniform(rng, lo, hi)
                jobs.append(
                    Job(rng.randrange(2**31), size, rng.randint(1, 8), METHODS[rng.randrange(len(METHODS))])
                )
        out.append(jobs)
    return out


def gradients(job: Job) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(job.seed)
    n = min(job.n_tensors, job.numel)
    sizes = [job.numel // n] * n
    sizes[-1] += job.numel - sum(sizes)
    forget = [torch.randn(s, generator=gen) for s in sizes]
    retain = [torch.randn(s, generator=gen) - 0.3 * f for s, f in zip(sizes, forget)]
    return {"retain": retain, "forget": forget}


def check(job: Job, groups: dict[str, list[torch.Tensor]], got: Any, weights: dict[str, float]) -> bool:
    from gradweight.methods import parse_method
    from gradweight_server.engine import run

    spec = parse_method(dict(job.method))
    used = {g: ts for g, ts in groups.items() if spec.name != "none" or g == "forget"}
    want = run(spec, used, keys=[str(i) for i in range(len(groups["forget"]))])
    got_t = torch.as_tensor(got)
    if got_t.shape != want.flat.shape or not torch.allclose(got_t, want.flat, rtol=1e-4, atol=1e-5):
        return False
    return all(abs(weights[g] - w) <= 1e-6 * max(1.0, abs(w)) for g, w in (want.weights or {}).items())


def client_loop(url: str, jobs: list[Job], tally: Tally, deadline: float, verify: bool) -> None:
    import gradweight

    with gradweight.Client(url, retries=0, timeout=300) as client:
        for job in jobs:
            if time.monotonic() > deadline:
                with tally.lock:
                    tally.errors["time-limit"] += 1
                continue
            groups = gradients(job)
            t0 = time.perf_counter()
            try:
                result = client.combine(
                    forget=groups["forget"], retain=groups["retain"], method=dict(job.method)
                )
            except Exception as exc:
                code = getattr(exc, "code", None) or type(exc).__name__
                with tally.lock:
                    tally.errors[str(code)] += 1
                continue
            elapsed = time.perf_counter() - t0
            ok = not verify or check(job, groups, result.scaled_grad, result.weights or {})
            with tally.lock:
                tally.latencies.append(elapsed)
                tally.body_bytes += 8 * job.numel
                if not ok:
                    tally.mismatches += 1


def run_phase(
    url: str, jobs: list[list[Job]], deadline: float, verify: bool, pid: int | None = None
) -> tuple[Tally, float, list[tuple[int, float]]]:
    """Run every client's jobs at once; with `pid`, sample the server's RSS as requests complete."""
    tally = Tally()
    samples: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            with tally.lock:
                n = len(tally.latencies) + sum(tally.errors.values())
            if pid is not None:
                samples.append((n, round(rss(pid) / MiB, 1)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(client_loop, url, js, tally, deadline, verify) for js in jobs]
            for f in futures:
                f.result()
    finally:
        done.set()
        sampler.join(timeout=5)
    return tally, time.perf_counter() - t0, samples


def quartiles(samples: list[tuple[int, float]], total: int) -> dict[str, float]:
    """Server RSS (MiB) when a quarter, half, three quarters and all of the phase's requests were done."""
    out: dict[str, float] = {}
    for q in (0.25, 0.5, 0.75, 1.0):
        after = [mib for n, mib in samples if n >= q * total]
        if after:
            out[f"{int(q * 100)}%"] = after[0]
    return out


def rss(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready within {timeout} s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


def summary(tally: Tally, wall: float) -> dict[str, Any]:
    n = len(tally.latencies)
    return {
        "requests_ok": n,
        "errors": dict(tally.errors),
        "mismatches": tally.mismatches,
        "wall_s": round(wall, 2),
        "throughput_rps": round(n / wall, 2) if wall else None,
        "throughput_mib_s": round(tally.body_bytes / MiB / wall, 1) if wall else None,
        "p50_ms": round(statistics.median(tally.latencies) * 1000, 1) if n else None,
        "p99_ms": round(percentile(tally.latencies, 0.99) * 1000, 1) if n else None,
        "max_ms": round(max(tally.latencies) * 1000, 1) if n else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50, help="requests per client in the measured phase")
    p.add_argument("--warmup", type=int, default=200, help="requests in all in the warm-up phase")
    p.add_argument("--mix", choices=("trainer", "request"), default="trainer")
    p.add_argument("--min-bytes", type=float, default=4096)
    p.add_argument("--max-bytes", type=float, default=40e6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--env", action="append", default=[], help="extra GRADWEIGHT_*=value for the server")
    p.add_argument("--url", help="use this running loopback server instead of starting one (no RSS then)")
    p.add_argument("--no-verify", action="store_true", help="skip the engine comparison")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this (client) process")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--time-limit", type=float, default=1800.0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    deadline = time.monotonic() + args.time_limit

    proc: subprocess.Popen[bytes] | None = None
    if args.url:
        url = args.url.rstrip("/")
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be a loopback address")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "GRADWEIGHT_MAX_CONCURRENCY": str(args.max_concurrency),
            "GRADWEIGHT_LOG_LEVEL": "warning",
        }
        for kv in args.env:
            k, _, v = kv.partition("=")
            env[k if k.startswith("GRADWEIGHT_") else "GRADWEIGHT_" + k.upper()] = v
        cmd = [sys.executable, "-m", "gradweight_server.main", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen([*cmd, "--device", args.device], env=env)
    try:
        wait_ready(url, proc, 120)
        per_client_warm = max(0, math.ceil(args.warmup / args.clients))
        warm_jobs = plan(args.clients, per_client_warm, 0, args.mix, args.min_bytes, args.max_bytes)
        if args.mix == "trainer":  # a trainer's warm-up steps have its own size and method
            warm_jobs = [
                [Job(j.seed, m[0].body_bytes, m[0].n_tensors, m[0].method) for j in w]
                for w, m in zip(warm_jobs, plan(args.clients, 1, 1, args.mix, args.min_bytes, args.max_bytes))
            ]
        warm, warm_wall, _ = run_phase(url, warm_jobs, deadline, not args.no_verify)
        rss_warm = rss(proc.pid) if proc else None
        jobs = plan(args.clients, args.requests, 1, args.mix, args.min_bytes, args.max_bytes)
        pid = proc.pid if proc else None
        tally, wall, samples = run_phase(url, jobs, deadline, not args.no_verify, pid)
        rss_end = rss(proc.pid) if proc else None
        hwm = rss(proc.pid, "VmHWM") if proc else None
        total = (
            len(warm.latencies)
            + sum(warm.errors.values())
            + len(tally.latencies)
            + sum(tally.errors.values())
        )
        report: dict[str, Any] = {
            "config": {
                "clients": args.clients,
                "requests_per_client": args.requests,
                "warmup_requests": per_client_warm * args.clients,
                "mix": args.mix,
                "body_bytes": [int(args.min_bytes), int(args.max_bytes)],
                "device": args.device,
                "max_concurrency": args.max_concurrency,
                "env": args.env,
                "verify": not args.no_verify,
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
            },
            "warmup": summary(warm, warm_wall),
            "measured": summary(tally, wall),
            "requests_total": total,
        }
        if rss_warm is not None and rss_end is not None:
            report["server_rss"] = {
                "after_warmup_mib": round(rss_warm / MiB, 1),
                "after_all_mib": round(rss_end / MiB, 1),
                "growth_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2),
                "peak_mib": round((hwm or 0) / MiB, 1),
                "during_measured_mib": quartiles(samples, args.clients * args.requests),
            }
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    failed = sum(tally.errors.values()) + tally.mismatches + sum(warm.errors.values()) + warm.mismatches
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
