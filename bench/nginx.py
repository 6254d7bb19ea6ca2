"""What nginx in front costs: one combine round trip straight to a replica and through nginx.

One gradweight-server process (CPU) and nginx with docker/nginx/nginx.conf (tests/scaleout/lb.py
starts both on 127.0.0.1), the Python client on torch tensors, `munba` on two float32 groups of N
parameters in 100 tensors: N * 8 bytes up and N * 4 down. Prints the median and best seconds of
`--repeat` round trips each way (alternating, after a warm-up), and nginx's extra time.

    .venv/bin/python bench/nginx.py [--sizes 1e7] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scaleout"))

import gradweight
import lb

N_TENSORS = 100


def groups(numel: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // N_TENSORS] * N_TENSORS
    sizes[-1] += numel - sum(sizes)
    forget = [torch.randn(s, generator=gen) for s in sizes]
    retain = [torch.randn(s, generator=gen) - 0.3 * f for s, f in zip(sizes, forget)]
    return forget, retain


def once(client: gradweight.Client, forget: Any, retain: Any) -> float:
    t0 = time.perf_counter()
    client.combine(forget, retain, "munba")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e7])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print("| parameters | direct median (best) s | through nginx median (best) s | nginx extra |")
    print("|---|---|---|---|")
    with lb.replicas(1) as reps:
        (_, direct_url) = reps[0]
        with lb.nginx([direct_url, direct_url]) as lb_url:
            for size in args.sizes:
                numel = int(size)
                forget, retain = groups(numel)
                times: dict[str, list[float]] = {"direct": [], "nginx": []}
                with gradweight.Client(direct_url) as direct, gradweight.Client(lb_url) as through:
                    once(direct, forget, retain)
                    once(through, forget, retain)
                    for _ in range(args.repeat):
                        times["direct"].append(once(direct, forget, retain))
                        times["nginx"].append(once(through, forget, retain))
                d, n = statistics.median(times["direct"]), statistics.median(times["nginx"])
                best_d, best_n = min(times["direct"]), min(times["nginx"])
                print(
                    f"| {numel:,} | {d:.3f} ({best_d:.3f}) | {n:.3f} ({best_n:.3f}) "
                    f"| {(n - d) * 1e3:+.0f} ms ({(n / d - 1) * 100:+.0f}%) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
