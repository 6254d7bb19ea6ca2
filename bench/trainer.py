"""A vision_unlearning LoRA unlearning step: upstream's class in-process against gradweight remotely.

The gradients are those of `UnlearnerLora` on Stable Diffusion 1.5: 16 UNet transformer blocks x (self,
cross) attention x (q, k, v, out) x LoRA (down [r, in], up [out, r]) = 256 float32 tensors, 199,296 x r
parameters (rank 4: 797,184; rank 16: 3,188,736). One step is what lora.py does after the two backward
passes: `weight_grads(grads_forget, grads_retain, accelerator)`, then `torch.split` + `view` into each
parameter's `.grad`. Cases: `upstream` (vision_unlearning's GradientWeightingMethod<Method>, in-process),
`remote_full`/`remote_gram` (gradweight.RemoteWeighting) and `dropin_full`/`dropin_gram`
(gradweight.vision_unlearning.GradientWeightingMethodRemote, which adds the finiteness check), against a
local `gradweight-server` started as a subprocess. Steps are interleaved across cases (one step of each
in turn) so load from other jobs hits every case alike; it prints the median and p90 of `--steps` steps
after `--warmup`, the ratio of medians to upstream's, and where each remote case's time goes (the medians
of its results' `timing`).

`--drift` measures instead how float32 rounding differences grow over a 100-step munba run: the toy
unlearning task of examples/unlearn.py, trained through lora.py's update lines, by upstream's class, by
the drop-in, and by upstream's class on gradients perturbed by 1e-7 relative noise (5 draws).

    .venv/bin/python bench/trainer.py [--ranks 4 16] [--steps 40] [--method munba] [--plot out.png]
    .venv/bin/python bench/trainer.py --drift [--drift-steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from load import free_port, percentile, wait_ready

ROOT = Path(__file__).resolve().parents[1]
# (channels, count) of SD 1.5's UNet transformer blocks: down 320x2, 640x2, 1280x2; mid 1280; up 1280x3,
# 640x3, 320x3 (the order of unet.parameters()); cross-attention k/v read the 768-wide text embedding.
BLOCKS = [(320, 2), (640, 2), (1280, 2), (1280, 1), (1280, 3), (640, 3), (320, 3)]
TEXT_DIM = 768
CASES = ("upstream", "remote_full", "remote_gram", "dropin_full", "dropin_gram")


def lora_shapes(rank: int) -> list[tuple[int, int]]:
    """The 256 LoRA weight shapes of an SD 1.5 UNet with LoRA on to_q/to_k/to_v/to_out.0, in order."""
    shapes: list[tuple[int, int]] = []
    for channels, count in BLOCKS:
        for _ in range(count):
            for cross in (False, True):
                for proj in ("q", "k", "v", "out"):
                    fan_in = TEXT_DIM if cross and proj in ("k", "v") else channels
                    shapes += [(rank, fan_in), (channels, rank)]
    return shapes


def lora_grads(
    rank: int, *, seed: int = 0, conflict: float = 0.3, device: str = "cpu"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(grads_forget, grads_retain) of LoRA shapes, float32, retain leaning against forget."""
    gen = torch.Generator().manual_seed(seed)
    forget, retain = [], []
    for shape in lora_shapes(rank):
        f = torch.randn(shape, generator=gen) * 1e-3
        forget.append(f.to(device))
        retain.append((torch.randn(shape, generator=gen) * 1e-3 - conflict * f).to(device))
    return forget, retain


def upstream_class(method: str) -> type[Any]:
    from vision_unlearning.utils import gradient_weighting as gw

    classes: dict[str, type[Any]] = {
        "none": gw.GradientWeightingMethodNone,
        "simple": gw.GradientWeightingMethodSimple,
        "munba": gw.GradientWeightingMethodMunba,
    }
    return classes[method]


def lora_update(params: Sequence[torch.nn.Parameter], scaled_grad: torch.Tensor) -> None:
    """lora.py's lines after weight_grads: split the flat result and view each piece as a `.grad`."""
    for param, update in zip(params, torch.split(scaled_grad, [p.numel() for p in params])):
        param.grad = update.view(param.shape)


def lora_step(
    params: Sequence[torch.nn.Parameter],
    weighting: Any,
    loss_forget: Callable[[], torch.Tensor],
    loss_retain: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    accelerator: Any,
    max_grad_norm: float = 1.0,
    noise: float = 0.0,
    gen: torch.Generator | None = None,
) -> None:
    """One step as `UnlearnerLora._train_step` takes it: two backward passes, `.grad` clones, weighting,
    split/view, clip_grad_norm_ (none when `max_grad_norm` is 0), optimizer step. `noise` perturbs each
    gradient by that relative amount."""
    optimizer.zero_grad()
    torch.autograd.backward(loss_forget())
    grads_forget = [p.grad.clone() for p in params if p.grad is not None]
    optimizer.zero_grad()
    torch.autograd.backward(loss_retain())
    grads_retain = [p.grad.clone() for p in params if p.grad is not None]
    if noise:
        grads_forget, grads_retain = (
            [g * (1 + noise * torch.randn(g.shape, generator=gen)) for g in gs]
            for gs in (grads_forget, grads_retain)
        )
    scaled_grad = weighting.weight_grads(grads_forget, grads_retain, accelerator)
    lora_update(params, scaled_grad)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


def start_server(device: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADWEIGHT_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "gradweight_server.main", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--device", device], env=env)
    wait_ready(url, proc, 120)
    return url, proc


def make_cases(url: str, method: str) -> tuple[dict[str, Any], Callable[[], None]]:
    from gradweight import Client, RemoteWeighting
    from gradweight.vision_unlearning import GradientWeightingMethodRemote

    spec = {"name": method, **({"forget_weight": 0.3, "retain_weight": 1.0} if method == "simple" else {})}
    options = {k: v for k, v in spec.items() if k != "name"}
    clients = [Client(url), Client(url)]
    cases: dict[str, Any] = {
        "upstream": upstream_class(method)(**options),
        "remote_full": RemoteWeighting(clients[0], spec, mode="full"),
        "remote_gram": RemoteWeighting(clients[1], spec, mode="gram"),
        "dropin_full": GradientWeightingMethodRemote(url=url, method=spec, mode="full"),
        "dropin_gram": GradientWeightingMethodRemote(url=url, method=spec, mode="gram"),
    }

    def close() -> None:
        for c in clients:
            c.close()
        cases["dropin_full"].close()
        cases["dropin_gram"].close()

    return cases, close


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_rank(
    url: str, rank: int, method: str, steps: int, warmup: int, device: str
) -> list[dict[str, Any]]:
    forget, retain = lora_grads(rank, device=device)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in forget]
    accelerator = SimpleNamespace(device=torch.device(device))
    cases, close = make_cases(url, method)
    times: dict[str, list[float]] = {name: [] for name in cases}
    parts: dict[str, dict[str, list[float]]] = {name: {} for name in cases}
    try:
        for step in range(warmup + steps):
            for name, weighting in cases.items():
                sync(device)
                t0 = time.perf_counter()
                lora_update(params, weighting.weight_grads(forget, retain, accelerator))
                sync(device)
                if step >= warmup:
                    times[name].append(time.perf_counter() - t0)
                    last = getattr(weighting, "last", None)
                    for key, ms in (last.timing if last is not None else {}).items():
                        parts[name].setdefault(key, []).append(ms)
    finally:
        close()
    base = statistics.median(times["upstream"])
    numel = sum(g.numel() for g in forget)
    return [
        {
            "rank": rank,
            "params": numel,
            "case": name,
            "median_ms": statistics.median(ts) * 1e3,
            "p90_ms": percentile(ts, 0.9) * 1e3,
            "x_upstream": statistics.median(ts) / base,
            "parts_ms": {key: statistics.median(v) for key, v in parts[name].items()},
        }
        for name, ts in times.items()
    ]


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(f"{'rank':>4} {'params':>10} {'case':>12} {'median ms':>10} {'p90 ms':>8} {'x upstream':>11}")
    print("-" * 60)
    for r in rows:
        print(
            f"{r['rank']:>4} {r['params']:>10,} {r['case']:>12} {r['median_ms']:>10.1f} "
            f"{r['p90_ms']:>8.1f} {r['x_upstream']:>11.2f}"
        )
    print("\nwhere the time goes (median ms of the result's `timing`: gram mode's client-side passes and")
    print("round trip; full mode's server-side receive, decode, compute, encode):")
    for r in rows:
        if r["parts_ms"]:
            shown = "  ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in r["parts_ms"].items())
            print(f"{r['rank']:>4} {r['case']:>12}  {shown}")


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    ranks = sorted({r["rank"] for r in rows})
    fig, axes = plt.subplots(1, len(ranks), figsize=(5 * len(ranks), 3.5), squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        sel = [r for r in rows if r["rank"] == rank]
        ax.bar([r["case"] for r in sel], [r["median_ms"] for r in sel], label="median")
        cases = [r["case"] for r in sel]
        ax.scatter(cases, [r["p90_ms"] for r in sel], color="k", marker="_", s=200, label="p90")
        ax.set_title(f"rank {rank}: {sel[0]['params']:,} params, 256 tensors")
        ax.set_ylabel("ms per step")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def load_example() -> ModuleType:
    """examples/unlearn.py, the toy unlearning task."""
    sys.path.insert(0, str(ROOT / "examples"))
    import unlearn

    return unlearn


def drift_run(
    weighting: Any, steps: int, clip: float, noise: float = 0.0, seed: int = 1, lr: float = 0.1
) -> list[torch.Tensor]:
    """`steps` munba steps on the example's task through lora.py's lines; the final parameters."""
    ex = load_example()
    data = ex.make_data()
    model = ex.make_model()
    ex.train(model, data)
    forget, retain = ex.split(data, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    ce = torch.nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    for _ in range(steps):
        lora_step(
            params,
            weighting,
            lambda: -ce(model(forget.x), forget.y),
            lambda: ce(model(retain.x), retain.y),
            opt,
            accelerator,
            max_grad_norm=clip,
            noise=noise,
            gen=gen,
        )
    return [p.detach().clone() for p in params]


def drift(url: str, steps: int, clip: float) -> dict[str, float]:
    from gradweight.vision_unlearning import GradientWeightingMethodRemote

    upstream = upstream_class("munba")()
    base = drift_run(upstream, steps, clip)
    runs = {"upstream, repeated": drift_run(upstream, steps, clip)}
    for seed in range(1, 6):
        runs[f"upstream, 1e-7 noise #{seed}"] = drift_run(upstream, steps, clip, noise=1e-7, seed=seed)
    for mode in ("full", "gram"):
        with GradientWeightingMethodRemote(url=url, method="munba", mode=mode) as dropin:
            runs[f"drop-in, {mode}"] = drift_run(dropin, steps, clip)
    scale = max(float(p.abs().max()) for p in base)
    clipped = f"clip_grad_norm {clip:g}" if clip else "no clipping"
    print(f"munba, {steps} steps on examples/unlearn.py's task (SGD lr 0.1, {clipped})", end="")
    print(f", max |param| {scale:.3f}")
    out: dict[str, float] = {}
    for name, params in runs.items():
        diff = max(float((p - q).abs().max()) for p, q in zip(params, base))
        out[name] = diff
        print(f"  {name:>25}: max |param - upstream's| = {diff:.3g}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--method", choices=("munba", "simple", "none"), default="munba")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu", help="the gradients' and the server's device")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this (trainer) process")
    p.add_argument("--url", help="a running loopback server instead of a subprocess")
    p.add_argument("--plot", help="write a PNG of the table here (needs matplotlib)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--drift", action="store_true", help="measure the 100-step drift instead")
    p.add_argument("--drift-steps", type=int, default=100)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="--drift: lora.py's clip (0: none)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    proc = None
    url = args.url
    if url is None:
        url, proc = start_server(args.device)
    try:
        if args.drift:
            result: Any = drift(url, args.drift_steps, args.max_grad_norm)
        else:
            result = [
                row
                for rank in args.ranks
                for row in bench_rank(url, rank, args.method, args.steps, args.warmup, args.device)
            ]
            print_table(
                result,
                f"method={args.method} device={args.device} torch={torch.__version__} "
                f"threads={torch.get_num_threads()} steps={args.steps} after {args.warmup} warm-up "
                "(one step: weight_grads + split/view into .grad)",
            )
            if args.plot:
                plot(result, args.plot)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
