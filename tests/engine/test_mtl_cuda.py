"""The new multi-task methods on a CUDA device give the CPU's numbers (skipped without CUDA); the
elementwise pass runs on the device, and GradDrop's CUDA draws are seeded and repeatable."""

from __future__ import annotations

import pytest
import torch
from gradweight.methods import parse_method
from gradweight_server.engine import run

from .mtl_cases import case_seed, groups_of, matrix, spec_for

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def on_cuda(groups: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    return {n: [t.cuda() for t in ts] for n, ts in groups.items()}


@pytest.mark.parametrize(
    "name", ["config", "random", "constant", "trimmed_mean", "modo", "pcd", "sdmgrad", "crmogm"]
)
def test_cuda_matches_cpu(name: str) -> None:
    k = 5
    spec = spec_for(name, k)
    groups = groups_of(matrix(k, seed=case_seed("cuda", name)))
    cpu, gpu = run(spec, groups), run(spec, on_cuda(groups))
    assert gpu.flat.device.type == "cuda"
    assert (gpu.weights is None) == (cpu.weights is None)
    for n in cpu.weights or {}:
        assert gpu.weights is not None
        assert gpu.weights[n] == pytest.approx(cpu.weights[n], rel=1e-5)
    torch.testing.assert_close(gpu.flat.cpu(), cpu.flat, rtol=1e-5, atol=1e-7)


def test_graddrop_on_cuda_is_seeded_and_keeps_one_sign() -> None:
    k = 6
    groups = on_cuda(groups_of(matrix(k, seed=3)))
    spec = parse_method({"name": "graddrop", "seed": 9})
    a, b = run(spec, groups), run(spec, groups)
    assert torch.equal(a.flat, b.flat)
    j = torch.stack([torch.cat([t.reshape(-1) for t in ts]) for ts in groups.values()])
    pos, neg = j.clamp(min=0).sum(0), j.clamp(max=0).sum(0)
    assert bool(((a.flat == pos) | (a.flat == neg) | (a.flat == 0)).all())
