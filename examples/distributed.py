"""Unlearning on several ranks with torchrun: DDP (replicated gradients) and FSDP2 (sharded gradients).

Every rank takes its share of the data. Each step computes the gradient of the negated loss on the class
to forget and of the loss on the rest; DDP averages both over the ranks, FSDP2 reduce-scatters them so
each rank holds a shard. `gradweight.distributed.combine` then makes one server request for the whole
job: with DDP rank 0 asks and broadcasts the answer; with FSDP each rank's partial gram is summed by one
all_reduce, rank 0 asks /v1/weights for k x k numbers, and each rank combines its own shard in place
into `.grad` before the optimiser step.

    gradweight-server &          # or: make serve
    torchrun --nproc-per-node 2 examples/distributed.py --url http://127.0.0.1:8000 --method nash
    torchrun --nproc-per-node 2 examples/distributed.py --strategy fsdp --steps 30

CPU ranks use the gloo backend, GPU ranks NCCL (one GPU per rank, picked by LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from gradweight import Client, distributed
from torch import nn

N_CLASSES = 4
DIM = 8
FORGET = 0


def make_data(rank: int, world: int, n_per_class: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian clusters (the same on every rank); each rank keeps every world-th sample."""
    gen = torch.Generator().manual_seed(0)
    centers = 1.5 * torch.randn(N_CLASSES, DIM, generator=gen)
    x = torch.cat([c + torch.randn(n_per_class, DIM, generator=gen) for c in centers])
    y = torch.arange(N_CLASSES).repeat_interleave(n_per_class)
    return x[rank::world], y[rank::world]


def make_model(strategy: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, N_CLASSES)).to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: the local shard of an FSDP2 DTensor, else the tensor itself."""
    to_local: Callable[[], torch.Tensor] | None = getattr(grad, "to_local", None)
    return to_local() if to_local is not None else grad


def grads_of(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.autograd.backward([loss])
    return [local(p.grad) for p in model.parameters() if p.grad is not None]


def unlearn(client: Client, strategy: str, method: str, steps: int, lr: float, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = make_data(rank, world)
    x, y = x.to(device), y.to(device)
    forget_mask = y == FORGET
    model = make_model(strategy, device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.functional.cross_entropy
    state: str | None = None
    for step in range(steps):
        # one forward and backward per group (FSDP2 re-gathers the parameters for each): ascent on the
        # class to forget, descent on the rest; the retain gradients stay in .grad
        forget_loss = loss_fn(model(x[forget_mask]), y[forget_mask])
        forget = [g.clone() for g in grads_of(model, -forget_loss)]
        retain_loss = loss_fn(model(x[~forget_mask]), y[~forget_mask])
        retain = grads_of(model, retain_loss)
        res = distributed.combine(
            client, forget, retain, method, sharded=strategy == "fsdp", out=retain, state=state
        )
        state = res.state
        opt.step()
        if rank == 0:
            w = ", ".join(f"{k}={v:+.3f}" for k, v in (res.weights or {}).items())
            print(
                f"{strategy} step {step:3d}  forget loss {forget_loss.item():.3f}  "
                f"retain loss {retain_loss.item():.3f}  weights {w}",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("GRADWEIGHT_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("GRADWEIGHT_TOKEN"))
    parser.add_argument("--strategy", nargs="+", choices=["ddp", "fsdp"], default=["ddp"])
    parser.add_argument("--method", default="nash")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    args: Any = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        with Client(args.url, token=args.token) as client:
            for strategy in args.strategy:
                unlearn(client, strategy, args.method, args.steps, args.lr, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
