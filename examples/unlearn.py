"""Unlearn one class of a synthetic data set with a remote gradient weighting.

A small MLP learns four Gaussian clusters; then each unlearning step takes the gradient of the *negated*
loss on the class to forget (ascent) and of the loss on the rest (descent), asks the server to weight
them (`RemoteWeighting`, the seed's drop-in) and writes the result into `.grad` before an SGD step.
With `nash` the forget loss climbs while the retain loss holds; the seed's `munba` closed form, which
meets the Nash condition only at cosine -0.5, lowers the forget loss on this task instead.

Run it with the Python of the repository's `.venv` (`make serve` creates it; the system python has no
torch and no gradweight), or after `source .venv/bin/activate`:

    make serve                   # in one shell (or: .venv/bin/gradweight-server)
    .venv/bin/python examples/unlearn.py --url http://127.0.0.1:8000 --method nash --steps 30
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from gradweight import Client, RemoteWeighting, apply_grads
from torch import nn

N_CLASSES = 4
DIM = 8


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def make_data(n_per_class: int = 200, *, seed: int = 0) -> Split:
    """Four well-separated Gaussian clusters in DIM dimensions."""
    gen = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(N_CLASSES, DIM, generator=gen)
    x = torch.cat([c + torch.randn(n_per_class, DIM, generator=gen) for c in centers])
    y = torch.arange(N_CLASSES).repeat_interleave(n_per_class)
    return Split(x, y)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def loss_of(model: nn.Module, data: Split) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data.x), data.y))


def train(model: nn.Module, data: Split, steps: int = 100, lr: float = 0.02) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x), data.y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        apply_grads(model.parameters(), list(grads))
        opt.step()


def split(data: Split, forget_class: int) -> tuple[Split, Split]:
    mask = data.y == forget_class
    return Split(data.x[mask], data.y[mask]), Split(data.x[~mask], data.y[~mask])


def unlearn(
    weighting: RemoteWeighting, model: nn.Module, forget: Split, retain: Split, steps: int, lr: float = 0.1
) -> list[tuple[float, float]]:
    """`steps` weighted steps; returns (forget loss, retain loss) before each step and after the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    history = [(loss_of(model, forget), loss_of(model, retain))]
    for _ in range(steps):
        f_loss = -nn.functional.cross_entropy(model(forget.x), forget.y)  # ascend on the forget set
        r_loss = nn.functional.cross_entropy(model(retain.x), retain.y)
        grads_forget = list(torch.autograd.grad(f_loss, params))
        grads_retain = list(torch.autograd.grad(r_loss, params))
        combined = weighting.weight_grads(grads_forget, grads_retain, None)
        apply_grads(params, combined)
        opt.step()
        history.append((loss_of(model, forget), loss_of(model, retain)))
    return history


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token")
    p.add_argument("--method", default="nash", help="munba, nash, simple, … (see `gradweight methods`)")
    p.add_argument("--mode", choices=["full", "gram"], default="full")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--forget-class", type=int, default=0)
    args = p.parse_args(argv)

    data = make_data()
    model = make_model()
    train(model, data)
    forget, retain = split(data, args.forget_class)
    with Client(args.url, token=args.token) as client:
        weighting = RemoteWeighting(client, args.method, mode=args.mode)
        history = unlearn(weighting, model, forget, retain, args.steps)
    for step, (f, r) in enumerate(history):
        print(f"step {step:3d}  forget loss {f:8.4f}  retain loss {r:8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
