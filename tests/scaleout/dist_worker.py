"""Entry points of the gloo worker processes (torch.multiprocessing.spawn imports this module by name)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradweight
from dist_cases import CASES, STEPS, call_args, shard
from gradweight import distributed

MODEL_TASKS = 3
MODEL_STEPS = 2
MODEL_METHOD = {"name": "gradvac", "seed": 3}
VARIANTS = ("replicated-full", "replicated-gram", "replicated-async", "sharded", "sharded-async")


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _step(
    client: Any, aclient: Any, variant: str, rank: int, world: int, case: Any, step: int, state: Any
) -> Any:
    full = case.grads(step)
    if variant.startswith("sharded"):
        grads = {g: [shard(t, rank, world).clone() for t in ts] for g, ts in full.items()}
    else:
        grads = full
    kw: dict[str, Any] = dict(call_args(case, grads), method=case.method, state=state)
    if variant == "replicated-full":
        res = distributed.combine(client, **kw)
        pieces = _split(res.scaled_grad, [t.numel() for t in full[case.names()[0]]])
    elif variant == "replicated-gram":
        res = distributed.combine(client, mode="gram", layout="params", **kw)
        pieces = [t.reshape(-1) for t in res.tensors]
    elif variant == "replicated-async":
        res = asyncio.run(_arun(aclient, layout="params", **kw))
        pieces = [t.reshape(-1) for t in res.tensors]
    elif variant == "sharded":
        # in place, into the first group's own tensors (as into a parameter's .grad)
        out = grads[case.names()[-1]]
        res = distributed.combine(client, sharded=True, out=out, **kw)
        pieces = [t.clone() for t in out]
    else:
        res = asyncio.run(_arun(aclient, sharded=True, **kw))
        pieces = _split(res.scaled_grad, [t.numel() for t in grads[case.names()[0]]])
    return res, pieces


async def _arun(url: str, **kw: Any) -> Any:
    async with gradweight.AsyncClient(url) as client:
        return await distributed.acombine(client, **kw)


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [p.clone() for p in flat.reshape(-1).split(sizes)]


def run(rank: int, world: int, store: str, url: str, hang_url: str, out_dir: str) -> None:
    """Every case x variant for STEPS steps (stateful methods carrying `state`), then the models; saved
    per rank. On 2 ranks the failure cases follow, last: they leave the group out of step."""
    _init(rank, world, store)
    saved: dict[str, Any] = {}
    with gradweight.Client(url) as client:
        for case in CASES:
            for variant in VARIANTS:
                state = None
                steps = []
                for step in range(STEPS):
                    res, pieces = _step(client, url, variant, rank, world, case, step, state)
                    state = res.state
                    steps.append({"weights": res.weights, "pieces": pieces, "state": state})
                saved[f"{case.name}/{variant}"] = steps
        saved["models"] = _models(client, rank, world)
    torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    if world == 2:
        _errors(rank, world, url, hang_url, out_dir)
        os._exit(0)  # the group is out of step after "asker-missing": do not tear it down collectively
    dist.barrier()
    dist.destroy_process_group()


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, MODEL_TASKS))


def _task_grads(model: torch.nn.Module, x: torch.Tensor, local: Any) -> dict[str, list[torch.Tensor]]:
    """One backward per task; the last task's gradients stay in .grad (the combine writes over them)."""
    params = list(model.parameters())
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(MODEL_TASKS):
        model.zero_grad(set_to_none=True)
        (model(x)[:, i] ** 2).mean().backward()
        grads = [local(p.grad) for p in params]
        out[f"task{i}"] = grads if i == MODEL_TASKS - 1 else [g.clone() for g in grads]
    return out


def _models(client: Any, rank: int, world: int) -> dict[str, Any]:
    """FSDP2 (`fully_shard`, sharded) and DDP (replicated) models, MODEL_STEPS steps of MODEL_METHOD."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    fsdp = _net()
    fully_shard(fsdp[0])
    fully_shard(fsdp[2])
    fully_shard(fsdp)
    ddp = DistributedDataParallel(_net())
    saved: dict[str, Any] = {"fsdp2": [], "ddp": []}
    states: dict[str, Any] = {"fsdp2": None, "ddp": None}
    for step in range(MODEL_STEPS):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for name, model, sharded in (("fsdp2", fsdp, True), ("ddp", ddp, False)):
            local = (lambda g: g.to_local()) if sharded else (lambda g: g)
            groups = _task_grads(model, x, local)
            inputs = {n: [g.clone() for g in gs] for n, gs in groups.items()}
            out = [local(p.grad) for p in model.parameters()]
            res = distributed.combine(
                client, groups=groups, method=MODEL_METHOD, sharded=sharded, out=out, state=states[name]
            )
            states[name] = res.state
            saved[name].append(
                {
                    "weights": res.weights,
                    "inputs": inputs,
                    "combined": [o.clone() for o in out],
                    "state": res.state,
                }
            )
    return saved


def _errors(rank: int, world: int, url: str, hang_url: str, out_dir: str) -> None:
    """Failures reach every rank and timeouts end as errors; records (what, exception type, text)."""
    case = CASES[0]
    got: list[tuple[str, str, str]] = []

    def attempt(what: str, fn: Any) -> None:
        try:
            fn()
            got.append((what, "ok", ""))
        except Exception as exc:
            got.append((what, type(exc).__name__, str(exc)))

    full = case.grads(0)
    with gradweight.Client(url) as client, gradweight.Client(hang_url, retries=0) as hang:
        five = {f"t{i}": full["forget"] for i in range(3)}
        # munba takes the forget/retain pair only: the server refuses three groups (422) on rank 0
        attempt("server-error", lambda: distributed.combine(client, groups=five, method="munba"))
        attempt("after-error", lambda: distributed.combine(client, **call_args(case, full), method="munba"))
        bad = {g: [shard(t, rank, world) for t in ts] for g, ts in full.items()}
        if rank == world - 1:
            bad["retain"] = bad["retain"][:-1]  # one rank's slice is broken
        attempt(
            "bad-slice",
            lambda: distributed.combine(client, sharded=True, **call_args(case, bad), method="munba"),
        )
        attempt(
            "server-hangs",
            lambda: distributed.combine(hang, **call_args(case, full), method="munba", timeout=1.5),
        )
        attempt("after-hang", lambda: distributed.combine(client, **call_args(case, full), method="munba"))
        if rank != 0:  # rank 0, the asking rank, never comes to this step
            attempt(
                "asker-missing",
                lambda: distributed.combine(client, **call_args(case, full), method="munba", timeout=1.0),
            )
    torch.save(got, os.path.join(out_dir, f"errors{rank}.pt"))
