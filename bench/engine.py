"""Engine benchmark: our gram/combine passes against the seed's implementation and torchjd's UPGrad.

For 1M, 10M and 50M float32 parameters per group (`--tensors`, 100 by default, separate tensors per
group) it prints the median time of repeated runs after a warm-up and the peak extra memory (RSS
high-water mark over the inputs, measured in a fresh subprocess per case), with ratios against ours and the
seed's time over each. `ours`/`ours_into` take the tensors as given (an in-process trainer's separate
gradients; `_into` writes into a reused output), `ours_body`/`ours_body_into` as views of one buffer per
group, as the server holds a request body. `--plot out.png` also draws the table.
Then, per size, the precision and determinism checks: each gram entry's error relative to
sqrt(K_ii K_jj) against the gram computed in float64 from the same values (ours, and per-tensor float32
dot products for comparison), and whether the gram and the combined gradient are the same bytes at 1 and
2 threads and in a worker thread.

    .venv/bin/python bench/engine.py [--sizes 1e6 1e7 5e7] [--repeat 7] [--device cpu|cuda] [--plot f.png]
                                     [--no-checks] [--share N]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

SHARE = 1  # `--share N`: `run`'s threads, which share the gram's and the combine's stretches
IMPLS = ("ours", "ours_into", "ours_body", "ours_body_into", "seed", "torchjd_upgrad")


def make_lists(numel: int, n_tensors: int, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // n_tensors] * n_tensors
    sizes[-1] += numel - sum(sizes)
    forget = [torch.randn(s, generator=gen).to(device) for s in sizes]
    retain = [(torch.randn(s, generator=gen) - 0.3 * f.cpu()).to(device) for s, f in zip(sizes, forget)]
    return forget, retain


def seed_munba(forget: list[torch.Tensor], retain: list[torch.Tensor]) -> torch.Tensor:
    """The seed's GradientWeightingMethodMunba.weight_grads as its source writes it."""
    g = torch.stack([torch.cat([t.view(-1) for t in retain]), torch.cat([t.view(-1) for t in forget])])
    k = g @ g.T
    k11, k12, k22 = k[0, 0], k[0, 1], k[1, 1]
    alpha_retain = torch.sqrt((2 * k11 * k22 + k12 * torch.sqrt(k11 * k22)) / (k11**2 * k22 - k11 * k12**2))
    alpha_forget = (1 - k11 * alpha_retain**2) / (k12 * alpha_retain)
    alpha = torch.tensor([alpha_retain, alpha_forget]).reshape(2, 1).to(g.device)
    return g.T @ alpha


def packed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as views of one buffer, back to back: how the server holds a group of a request body."""
    buf = torch.cat([t.reshape(-1) for t in tensors])
    return list(torch.split(buf, [t.numel() for t in tensors]))


def implementation(name: str, forget: list[torch.Tensor], retain: list[torch.Tensor]) -> Callable[[], Any]:
    if name.startswith("ours"):
        from gradweight.methods import Munba
        from gradweight_server.engine import run

        if "_body" in name:
            forget, retain = packed(forget), packed(retain)
        groups = {"retain": retain, "forget": forget}
        threads = SHARE
        if not name.endswith("_into"):
            return lambda: run(Munba(), groups, threads=threads).flat
        out = torch.empty(sum(t.numel() for t in forget), device=forget[0].device)
        return lambda: run(Munba(), groups, out=out, threads=threads).flat
    if name == "seed":
        return lambda: seed_munba(forget, retain)
    if name == "torchjd_upgrad":
        from torchjd.aggregation import UPGrad

        agg = UPGrad()
        return lambda: agg(
            torch.stack([torch.cat([t.view(-1) for t in retain]), torch.cat([t.view(-1) for t in forget])])
        )
    raise ValueError(name)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, numel: int, n_tensors: int, repeat: int, device: str) -> dict[str, float]:
    """One case, in this (fresh) process: peak extra memory of the first call, then median time."""
    forget, retain = make_lists(numel, n_tensors, device)
    fn = implementation(name, forget, retain)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = fn()
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del out
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "ms": statistics.median(times) * 1e3,
        "peak_mb": max(peak, 0) / 2**20,
        "out_mb": numel * 4 / 2**20,
    }


def gram_errors(forget: list[torch.Tensor], retain: list[torch.Tensor]) -> tuple[float, float]:
    """Worst entry error relative to sqrt(K_ii K_jj) of ours and of per-tensor float32 dots, against
    the gram summed in float64 (math.fsum over per-tensor float64 dot products)."""
    from gradweight_server.engine.passes import gram

    groups = [retain, forget]
    ref = [[0.0, 0.0], [0.0, 0.0]]
    f32 = [[0.0, 0.0], [0.0, 0.0]]
    for i in range(2):
        for j in range(2):
            pairs = list(zip(groups[i], groups[j]))
            ref[i][j] = math.fsum(float(torch.dot(a.double(), b.double())) for a, b in pairs)
            f32[i][j] = math.fsum(float(torch.dot(a, b)) for a, b in pairs)
    ours = gram(groups)[0].tolist()

    def worst(k: list[list[float]]) -> float:
        return max(
            abs(k[i][j] - ref[i][j]) / math.sqrt(ref[i][i] * ref[j][j]) for i in range(2) for j in range(2)
        )

    return worst(ours), worst(f32)


def same_bytes(forget: list[torch.Tensor], retain: list[torch.Tensor]) -> bool:
    """The munba step at 1 thread, at 2 threads and in a worker thread: identical gram, weights, output."""
    from gradweight.methods import Munba
    from gradweight_server.engine import run

    def step() -> tuple[Any, ...]:
        out = run(Munba(), {"retain": retain, "forget": forget})
        return out.gram, out.weights, out.flat.numpy().tobytes()

    before = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(step())
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(step()))
    worker.start()
    worker.join()
    torch.set_num_threads(before)
    return all(r == results[0] for r in [*results[1:], *box])


def checks(sizes: list[float], n_tensors: int, device: str) -> None:
    header = (
        f"{'params/group':>12} {'gram err ours':>14} {'f32 dots':>9} {'same bytes 1/2 threads, worker':>31}"
    )
    print(f"\n{header}")
    for size in sizes:
        forget, retain = make_lists(int(size), n_tensors, device)
        ours, f32 = gram_errors(forget, retain)
        same = same_bytes(forget, retain) if device == "cpu" else "n/a (cpu only)"
        print(f"{int(size):>12,} {ours:>14.1e} {f32:>9.1e} {same!s:>31}")
        del forget, retain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 5e7])
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--plot", help="write a PNG of the timings (needs matplotlib)")
    ap.add_argument("--no-checks", action="store_true", help="skip the precision and determinism checks")
    ap.add_argument("--share", type=int, default=1, help="`run`'s threads for the ours rows (blocks.share)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global SHARE
    SHARE = args.share
    if args.case:
        name, numel = args.case.split(":")
        print(json.dumps(measure(name, int(numel), args.tensors, args.repeat, args.device)))
        return

    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        numel = int(size)
        results = {}
        for name in args.impls:
            cmd = [
                sys.executable,
                __file__,
                "--case",
                f"{name}:{numel}",
                "--tensors",
                str(args.tensors),
                "--repeat",
                str(args.repeat),
                "--device",
                args.device,
                "--share",
                str(args.share),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{name} at {numel}: failed\n{done.stderr[-800:]}", file=sys.stderr)
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"numel": numel, **results})

    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"share={args.share} tensors/group={args.tensors} repeat={args.repeat} "
        "(median ms; peak extra MiB over inputs)"
    )
    header = (
        f"{'params/group':>12} {'impl':>15} {'ms':>9} {'x ours':>7} {'seed/x':>7} {'peak MiB':>9} "
        f"{'peak/out':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ours = row.get("ours", {}).get("ms", math.nan)
        seed = row.get("seed", {}).get("ms", math.nan)
        for name in args.impls:
            if name not in row:
                continue
            r = row[name]
            print(
                f"{row['numel']:>12,} {name:>15} {r['ms']:>9.2f} {r['ms'] / ours:>7.2f} "
                f"{seed / r['ms']:>7.2f} {r['peak_mb']:>9.1f} {r['peak_mb'] / r['out_mb']:>8.2f}"
            )
    if not args.no_checks:
        checks(args.sizes, args.tensors, args.device)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in args.impls:
            xs = [r["numel"] for r in rows if name in r]
            ax.plot(xs, [r[name]["ms"] for r in rows if name in r], marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="parameters per group",
            ylabel="median ms",
            title=f"munba step on {args.device}",
        )
        ax.legend()
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
