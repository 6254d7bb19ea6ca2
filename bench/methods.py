"""Multi-task methods benchmark: ours (gram pass + weighting + combine pass) against torchjd's aggregators.

For each method and each group count k it times, on k groups of `--params` float32 parameters (split into
`--tensors` tensors each, as a model's gradients are):
  - ours, weights:   the gram pass + the method's weighting (what the server does before combining)
  - ours, full:      engine.run: gram, weights and the combined gradient written once
  - torchjd weights: stack the tensor lists into a k x n matrix + Gramian + torchjd's weighting
  - torchjd full:    stack + torchjd's aggregator (it needs the stacked matrix)
and prints medians of `--repeat` runs after one warm-up, the full-time ratio and the largest difference
between the two combined gradients (relative to its largest entry). The elementwise methods (no weights)
also get the memory floor: one read of the k inputs plus one write of the output, timed as the combine
pass with unit weights, and "ours pass": the elementwise pass alone into a reused output, as the floor
writes (ours full adds the engine's output allocation and its non-finite check of the result); GradDrop
also gets "draws": torch.rand of n float32 from a seeded CPU generator, the uniforms torchjd draws, which
both sides pay. Then `nash` against torchjd's NashMTL(max_norm=0) at `--nash-k` groups, with each
one's Nash residual max_i |(K a)_i a_i - 1|.

    .venv/bin/python bench/methods.py [--params 1e6] [--ks 2 4 8 16 64] [--methods upgrad mean ...]
        [--repeat 3] [--tensors 20] [--nash-k 16] [--device cpu|cuda] [--threads N] [--plot f.png]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

METHODS = (
    "upgrad",
    "dualproj",
    "mgda",
    "imtl_g",
    "aligned_mtl",
    "pcgrad",
    "cagrad",
    "krum",
    "fairgrad",
    "gradvac",
    "mean",
    "sum",
    "nash_mtl",
    "config",
    "random",
    "constant",
    "trimmed_mean",
    "graddrop",
    "modo",
    "pcd",
    "sdmgrad",
    "crmogm",
)
ELEMENTWISE = ("trimmed_mean", "graddrop")


def options(name: str, k: int) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {
        "pcgrad": {"seed": 0},
        "gradvac": {"seed": 0},
        "cagrad": {"c": 0.4},
        "krum": {"n_byzantine": 1 if k >= 4 else 0},
        "fairgrad": {"alpha": 1.0},
        "random": {"seed": 0},
        "constant": {"weights": {f"task{i}": 1.0 + i % 3 for i in range(k)}},
        "trimmed_mean": {"trim_number": k // 4},
        "graddrop": {"seed": 0},
        "crmogm": {"weighting": {"name": "upgrad"}},
    }
    return table.get(name, {})


def make_groups(k: int, numel: int, n_tensors: int, device: str) -> dict[str, list[torch.Tensor]]:
    """k groups sharing a common component (so that some conflict and some agree)."""
    gen = torch.Generator().manual_seed(k)
    sizes = [numel // n_tensors] * n_tensors
    sizes[-1] += numel - sum(sizes)
    common = [torch.randn(s, generator=gen) for s in sizes]
    groups = {}
    for i in range(k):
        sign = 1.0 if i % 3 else -0.5
        groups[f"task{i}"] = [
            (sign * c + torch.randn(s, generator=gen) * (1 + i % 4)).to(device) for s, c in zip(sizes, common)
        ]
    return groups


def stack(groups: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat([t.reshape(-1) for t in ts]) for ts in groups.values()])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int, device: str) -> tuple[float, Any]:
    out = fn()  # warm-up (imports, solver set-up, first-touch pages)
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def seeded(spec: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    seed = getattr(spec, "seed", None)
    if seed is None:
        return fn

    def call() -> Any:
        torch.manual_seed(seed)
        return fn()

    return call


def torchjd_objects(spec: Any, k: int) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(aggregator, weights-from-matrix) for spec, built as a torchjd user would."""
    from torchjd import aggregation as A

    if spec.name in ("modo", "sdmgrad"):  # matrix weightings of a k x k matrix: the user forms J Jᵀ
        weighting = A.MoDoWeighting() if spec.name == "modo" else A.SDMGradWeighting()
        return (lambda m: weighting(m @ m.T) @ m), (lambda m: weighting(m @ m.T))
    makers: dict[str, Callable[[], Any]] = {
        "upgrad": A.UPGrad,
        "dualproj": A.DualProj,
        "mgda": A.MGDA,
        "imtl_g": A.IMTLG,
        "aligned_mtl": A.AlignedMTL,
        "pcgrad": A.PCGrad,
        "cagrad": lambda: A.CAGrad(c=spec.c),
        "krum": lambda: A.Krum(n_byzantine=spec.n_byzantine),
        "fairgrad": lambda: A.FairGrad(alpha=spec.alpha),
        "gradvac": A.GradVac,
        "mean": A.Mean,
        "sum": A.Sum,
        "nash_mtl": lambda: A.NashMTL(n_tasks=k),
        "config": A.ConFIG,
        "random": A.Random,
        "constant": lambda: A.Constant(torch.tensor([spec.weights[f"task{i}"] for i in range(k)])),
        "trimmed_mean": lambda: A.TrimmedMean(spec.trim_number),
        "graddrop": A.GradDrop,
        "pcd": A.PCD,
        "crmogm": lambda: A.GramianWeightedAggregator(A.CRMOGMWeighting(A.UPGradWeighting())),
    }
    agg = makers[spec.name]()
    gramian_weighting = getattr(agg, "gramian_weighting", None)
    if gramian_weighting is not None:
        return agg, lambda m: gramian_weighting(m @ m.T)
    return agg, getattr(agg, "weighting", None)


def bench_method(
    name: str, k: int, groups: dict[str, list[torch.Tensor]], repeat: int, device: str
) -> dict[str, Any]:
    from gradweight.methods import parse_method
    from gradweight_server.engine import run
    from gradweight_server.engine.methods import aggregate, solve
    from gradweight_server.engine.passes import combine, gram

    spec = parse_method({"name": name, **options(name, k)})
    names = list(groups)
    tensors = list(groups.values())

    def ours_weights() -> torch.Tensor:
        k_matrix = gram(tensors)[0] if spec.needs_gram else None
        return solve(spec, k_matrix, names, None)[0]

    carried: dict[str, Any] = {"w": None, "full": None}

    def ours_weights_step() -> torch.Tensor:
        w, carried["w"] = solve(spec, gram(tensors)[0], names, carried["w"])
        return w

    def ours_full_step() -> torch.Tensor:
        out = run(spec, groups, state=carried["full"])
        carried["full"] = out.state
        return out.flat

    # stateful methods carry their state from call to call, as a training loop does (torchjd's objects
    # keep theirs); the first call of each is the warm-up
    elementwise = not spec.gives_weights
    t_ow = float("nan")
    if not elementwise:
        t_ow, _ = timed(seeded(spec, ours_weights_step if spec.stateful else ours_weights), repeat, device)
    t_of, _ = timed(ours_full_step, repeat, device)
    ours_flat = run(spec, groups).flat  # a fresh first step, compared with a fresh torchjd object below
    agg, tj_weights = torchjd_objects(spec, k)
    t_tw = float("nan")
    if tj_weights is not None and not elementwise:
        t_tw, _ = timed(seeded(spec, lambda: tj_weights(stack(groups))), repeat, device)
    floor = t_pass = draws = float("nan")
    if elementwise:
        out = torch.empty_like(ours_flat)
        floor, _ = timed(lambda: combine(tensors, [1.0] * k, out), repeat, device)
        t_pass, _ = timed(lambda: aggregate(spec, tensors, names, out), repeat, device)
        if name == "graddrop":
            gen = torch.Generator(device=device).manual_seed(0)
            draws, _ = timed(lambda: torch.rand(out.numel(), generator=gen, device=device), repeat, device)
    agg, _ = torchjd_objects(spec, k)  # stateful ones start fresh, as ours did
    t_tf, theirs = timed(seeded(spec, lambda: agg(stack(groups))), repeat, device)
    if spec.stateful:  # compare first steps: a fresh object against a fresh state
        agg, _ = torchjd_objects(spec, k)
        theirs = seeded(spec, lambda: agg(stack(groups)))()
    diff = float((ours_flat - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))
    return {
        "method": name,
        "k": k,
        "ours_weights": t_ow,
        "ours_full": t_of,
        "tj_weights": t_tw,
        "tj_full": t_tf,
        "speedup": t_tf / t_of,
        "diff": diff,
        "floor": floor,
        "pass": t_pass,
        "draws": draws,
    }


def bench_nash(k: int, numel: int, n_tensors: int, repeat: int, device: str) -> dict[str, Any]:
    from gradweight.methods import Nash
    from gradweight_server.engine import run
    from gradweight_server.engine.methods.nash import residual
    from gradweight_server.engine.passes import gram
    from torchjd.aggregation import NashMTL

    groups = make_groups(k, numel, n_tensors, device)
    k_matrix = gram(list(groups.values()))[0]
    t_ours, out = timed(lambda: run(Nash(), groups), repeat, device)
    ours_w = torch.tensor(list(out.weights.values()), dtype=torch.float64)
    agg = NashMTL(n_tasks=k, max_norm=0)
    t_tj, _ = timed(lambda: agg(stack(groups)), repeat, device)  # warm-started from its last call
    t_tj_fresh, _ = timed(lambda: NashMTL(n_tasks=k, max_norm=0)(stack(groups)), repeat, device)
    theirs_w = NashMTL(n_tasks=k, max_norm=0).weighting(stack(groups)).double().cpu()
    return {
        "k": k,
        "ours": t_ours,
        "torchjd": t_tj,
        "torchjd_fresh": t_tj_fresh,
        "speedup": t_tj / t_ours,
        "res_ours": residual(k_matrix, ours_w),
        "res_tj": residual(k_matrix, theirs_w),
        "weight_diff": float(((theirs_w - ours_w).abs() / ours_w).max()),
    }


def fmt_ms(s: float) -> str:
    if s != s:
        return "-"
    ms = s * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def print_table(rows: list[dict[str, Any]], numel: int) -> None:
    print(f"\n{numel / 1e6:g}M float32 parameters per group; medians in ms")
    head = (
        "method", "k", "ours weights", "ours full", "torchjd weights", "torchjd full", "speedup", "max diff",
        "memory floor", "full / floor", "ours pass", "pass / floor",
    )  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r["method"],
            str(r["k"]),
            fmt_ms(r["ours_weights"]),
            fmt_ms(r["ours_full"]),
            fmt_ms(r["tj_weights"]),
            fmt_ms(r["tj_full"]),
            f"{r['speedup']:.1f}x",
            f"{r['diff']:.1e}",
            fmt_ms(r["floor"]),
            "-" if r["floor"] != r["floor"] else f"{r['ours_full'] / r['floor']:.2f}x",
            fmt_ms(r["pass"]),
            "-" if r["floor"] != r["floor"] else f"{r['pass'] / r['floor']:.2f}x",
        ]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["draws"] == r["draws"]:
            print(
                f"graddrop k={r['k']}: its uniform draws alone (torch.rand, seeded): {fmt_ms(r['draws'])} ms"
            )


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot written")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows}, key=lambda m: METHODS.index(m))
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        ax.plot([r["k"] for r in rs], [r["speedup"] for r in rs], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("groups k")
    ax.set_ylabel("torchjd full / ours full")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=1e6, help="float32 parameters per group")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tensors", type=int, default=20, help="tensors per group")
    p.add_argument("--nash-k", type=int, default=16, help="0 skips the nash / NashMTL comparison")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is steadier on a shared box",
    )
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
    numel = int(args.params)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for k in args.ks:
        groups = make_groups(k, numel, args.tensors, args.device)
        for name in args.methods:
            if (name == "krum" and k < 3) or (name == "nash_mtl" and k < 2):
                continue
            rows.append(bench_method(name, k, groups, args.repeat, args.device))
            ours, theirs = fmt_ms(rows[-1]["ours_full"]), fmt_ms(rows[-1]["tj_full"])
            print(f"  {name:12s} k={k:<3d} ours {ours} ms, torchjd {theirs} ms", flush=True)
        del groups
        gc.collect()
    print_table(rows, numel)

    if args.nash_k:
        r = bench_nash(args.nash_k, numel, args.tensors, args.repeat, args.device)
        print(f"\nnash vs torchjd NashMTL(max_norm=0), k = {r['k']}, {numel / 1e6:g}M parameters per group")
        print("| | time (ms) | residual max_i abs((K a)_i a_i - 1) |")
        print("|---|---|---|")
        print(f"| nash (ours) | {fmt_ms(r['ours'])} | {r['res_ours']:.1e} |")
        print(f"| torchjd NashMTL, one object (warm start) | {fmt_ms(r['torchjd'])} | {r['res_tj']:.1e} |")
        fresh = fmt_ms(r["torchjd_fresh"])
        print(f"| torchjd NashMTL, a fresh object per call | {fresh} | {r['res_tj']:.1e} |")
        ratio = r["res_tj"] / max(r["res_ours"], 1e-300)
        print(
            f"speedup {r['speedup']:.1f}x, residual ratio {ratio:.1e}, "
            f"NashMTL weights off by up to {r['weight_diff']:.1e} (relative)"
        )
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
