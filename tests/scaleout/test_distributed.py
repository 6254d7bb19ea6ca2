"""gradweight.distributed on real gloo process groups (torch.multiprocessing, 2 and 4 ranks, CPU).

Each world runs every case (the forget/retain pair with munba; 5 tasks with gradvac, stateful, 2 steps)
in every variant (replicated: full, gram, async; sharded by hand: sync in place, async), then a real
FSDP2 (`fully_shard`) and a DDP model with 3 tasks, against one in-thread server. The test process then
compares every rank's result with the single-process one and counts the server's requests: one per
step, whatever the number of ranks.
"""

from __future__ import annotations

import multiprocessing
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_worker
import gradweight
import lb
from dist_cases import CASES, STEPS

pytestmark = pytest.mark.timeout(240)
EPS32 = float(np.finfo(np.float32).eps)
WEIGHT_TOL = 1e-12
REQUESTS = re.compile(
    r'^gradweight_requests_total\{route="/v1/(?:combine|weights)",status="200"\} (\S+)$', re.M
)
MODELS = ("fsdp2", "ddp")
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.nn.parallel",
    "gradweight.distributed",
]


def served(url: str) -> int:
    return int(sum(float(v) for v in REQUESTS.findall(httpx.get(url + "/metrics", timeout=10).text)))


def single_process(url: str, method: Any, steps: list[dict[str, list[torch.Tensor]]], mode: str) -> list[Any]:
    """The single-process answers for `steps` (groups by name), state carried from step to step."""
    out, state = [], None
    with gradweight.Client(url) as client:
        for groups in steps:
            kw = (
                {"forget": groups["forget"], "retain": groups["retain"]}
                if set(groups) == {"forget", "retain"}
                else {"groups": groups}
            )
            res = client.combine(**kw, method=method, state=state, mode=mode)
            state = res.state
            out.append(res)
    return out


def gram_is_exact(res: Any, groups: dict[str, list[torch.Tensor]], names: list[str]) -> bool:
    """Whether the server's full-mode gram is float64-exact (issue 10 makes it so)."""
    flats = np.stack([np.concatenate([t.double().reshape(-1).numpy() for t in groups[n]]) for n in names])
    exact = flats @ flats.T
    return bool(np.abs(np.array(res.gram) - exact).max() <= 1e-13 * np.diag(exact).max())


def check(
    what: str,
    weights: dict[str, float],
    combined: torch.Tensor,
    groups: dict,
    full: Any,
    gram: Any,
    mode: str,
) -> bool:
    """Weights within 1e-12 of the single-process answer in the same mode (and in the other mode once
    the server's gram is exact), the gradient within float32 rounding of single-process full mode:
    (k + 1) eps * sum_i |w_i| |g_i| per element."""
    names = list(groups)
    exact = gram_is_exact(full, groups, names)
    same, other = (full, gram) if mode == "full" else (gram, full)
    for ref in (same, other) if exact else (same,):
        for n in names:
            assert abs(weights[n] - ref.weights[n]) <= WEIGHT_TOL * max(1.0, abs(ref.weights[n])), (what, n)
    bound = sum(
        abs(full.weights[n]) * torch.cat([t.reshape(-1) for t in groups[n]]).double().abs() for n in names
    )
    err = (combined.reshape(-1).double() - full.scaled_grad.double()).abs()
    assert bool((err <= (len(names) + 1) * EPS32 * bound + 1e-30).all()), (what, float(err.max()))
    return exact


def spawn(fn: Any, world: int, *args: Any) -> None:
    """`world` processes from a fork server that has imported torch once: a fresh interpreter per rank
    (the spawn method) would import it `world` times, which is most of these tests' time."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(fn, args=(world, *args), nprocs=world, join=True, start_method="forkserver")


@pytest.fixture(scope="module")
def server():
    live = lb.start_server()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def worlds(server, tmp_path_factory) -> Iterator[Any]:
    """One spawn per world size, run on first use: (its directory, the server requests it made)."""
    done: dict[int, tuple[Path, int]] = {}
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)  # the kernel accepts connections; nothing ever answers
    hang_url = f"http://127.0.0.1:{hang.getsockname()[1]}"

    def get(world: int) -> tuple[Path, int]:
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}")
            before = served(server.url)
            spawn(dist_worker.run, world, str(out / "store"), server.url, hang_url, str(out))
            done[world] = (out, served(server.url) - before)
        return done[world]

    yield get
    hang.close()


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_the_single_process_result_with_one_request_per_step(server, worlds, world):
    out, requests = worlds(world)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    variants = dist_worker.VARIANTS
    # one request per step in all, not one per rank; on 2 ranks the failure cases answer 200 twice
    extra = 2 if world == 2 else 0
    assert requests == len(CASES) * len(variants) * STEPS + len(MODELS) * dist_worker.MODEL_STEPS + extra

    exact = True
    for case in CASES:
        steps = [{n: case.grads(s)[n] for n in case.names()} for s in range(STEPS)]
        full = single_process(server.url, case.method, steps, "full")
        gram = single_process(server.url, case.method, steps, "gram")
        for variant in variants:
            for s in range(STEPS):
                what = f"{case.name}/{variant} step {s}"
                got = [r[f"{case.name}/{variant}"][s] for r in ranks]
                for g in got:  # the same weights and state on every rank
                    assert (g["weights"], g["state"]) == (got[0]["weights"], got[0]["state"]), what
                if variant.startswith("sharded"):  # rank r holds slice r of every tensor
                    combined = torch.cat(
                        [torch.cat([g["pieces"][t] for g in got]) for t in range(len(got[0]["pieces"]))]
                    )
                else:  # every rank writes the same bytes
                    for g in got[1:]:
                        assert all(torch.equal(a, b) for a, b in zip(g["pieces"], got[0]["pieces"])), what
                    combined = torch.cat(got[0]["pieces"])
                mode = "full" if variant in ("replicated-full", "replicated-async") else "gram"
                exact &= check(what, got[0]["weights"], combined, steps[s], full[s], gram[s], mode)

    for model in MODELS:
        got = [r["models"][model] for r in ranks]
        steps, combined = [], []
        for s in range(dist_worker.MODEL_STEPS):
            for g in got:
                assert (g[s]["weights"], g[s]["state"]) == (got[0][s]["weights"], got[0][s]["state"]), model
            if model == "fsdp2":  # fully_shard's Shard(0): rank r holds rows r of every parameter
                inputs = {
                    n: [torch.cat([g[s]["inputs"][n][t] for g in got]) for t in range(4)]
                    for n in got[0][s]["inputs"]
                }
                combined.append(
                    torch.cat([torch.cat([g[s]["combined"][t] for g in got]).reshape(-1) for t in range(4)])
                )
            else:
                for g in got[1:]:
                    assert all(torch.equal(a, b) for a, b in zip(g[s]["combined"], got[0][s]["combined"])), (
                        model
                    )
                inputs = got[0][s]["inputs"]
                combined.append(torch.cat([t.reshape(-1) for t in got[0][s]["combined"]]))
            steps.append(inputs)
        full = single_process(server.url, dist_worker.MODEL_METHOD, steps, "full")
        gram = single_process(server.url, dist_worker.MODEL_METHOD, steps, "gram")
        for s in range(dist_worker.MODEL_STEPS):
            exact &= check(
                f"{model} step {s}",
                got[0][s]["weights"],
                combined[s],
                steps[s],
                full[s],
                gram[s],
                "gram" if model == "fsdp2" else "full",
            )
    if not exact:
        pytest.xfail(
            "the server's full-mode gram is not float64-exact yet (issue 10): the weights were checked at "
            "1e-12 against single-process answers of the same mode, across modes through the gradient only"
        )


def test_failures_and_timeouts_reach_every_rank(worlds):
    out, _ = worlds(2)
    got = [{w: (t, m) for w, t, m in torch.load(out / f"errors{r}.pt")} for r in range(2)]
    # the asking rank's failure (a 422, a server that never answers) is raised as itself on every rank
    for what, error in (("server-error", "InvalidGradients"), ("server-hangs", "StepTimeout")):
        assert [g[what][0] for g in got] == [error, error], (what, got)
    assert got[0]["server-error"][1] == got[1]["server-error"][1]
    # a broken slice on the last rank: it raises its own error, the others learn which rank failed
    assert got[1]["bad-slice"][0] == "ValueError", got
    assert got[0]["bad-slice"][0] == "GradweightError", got
    assert "[1]" in got[0]["bad-slice"][1], got
    # and the group still works after each
    for what in ("after-error", "after-hang"):
        assert [g[what][0] for g in got] == ["ok", "ok"], (what, got)
    # the asking rank never comes: the other gives up after twice the timeout
    assert "asker-missing" not in got[0]
    assert got[1]["asker-missing"][0] == "StepTimeout", got


def test_answers_and_errors_travel_as_data():
    """What the asking rank broadcasts is JSON: the answer round-trips exactly, errors keep their class
    (the package's and Python's built-in ones), anything else arrives as a GradweightError naming it."""
    from gradweight.distributed import StepTimeout, _Answer, _decode, _encode

    w = gradweight.WeightsResult(
        method={"name": "gradvac"}, weights={"a": 0.1 + 0.2, "b": -1e-300}, state="{}"
    )
    answer = _Answer(w, [[1.0, 1 / 3], [1 / 3, 2.0]], {"x_ms": 1.5}, "full", "bfloat16", {"k": (2, 3)})
    assert _decode(_encode(answer, None)) == (answer, None)

    class Custom(Exception):
        pass

    sent = [
        gradweight.InvalidGradients("bad shapes", request_id="r1", retry_after=None),
        gradweight.Overloaded("busy", request_id="r2", retry_after=2.0),
        ValueError("bad value"),
        StepTimeout("late"),
        Custom("odd"),
    ]
    for exc in sent:
        value, got = _decode(_encode(None, exc))
        assert value is None
        if isinstance(exc, Custom):
            assert type(got) is gradweight.GradweightError
            assert str(got) == "Custom: odd"
            continue
        assert type(got) is type(exc)
        assert str(got) == str(exc)
        if isinstance(exc, gradweight.APIError):
            assert (got.request_id, got.retry_after) == (exc.request_id, exc.retry_after)
