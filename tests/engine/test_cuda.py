"""The engine on a CUDA device gives the CPU's numbers (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from gradweight.methods import Munba, Nash, NoWeighting, Simple
from gradweight_server.engine import resolve_device, run

from .reference import pair, random_shapes

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("spec", [NoWeighting(), Simple(retain_weight=0.3), Munba(), Nash()], ids=str)
def test_cuda_matches_cpu(dtype: torch.dtype, spec) -> None:
    gen = torch.Generator().manual_seed(0)
    forget, retain = pair([(64, 33), *random_shapes(40, gen)], -0.4, gen, dtype)
    cpu = run(spec, {"retain": retain, "forget": forget})
    dev = resolve_device("cuda")
    gpu = run(spec, {"retain": [t.to(dev) for t in retain], "forget": [t.to(dev) for t in forget]})
    assert gpu.flat.device.type == "cuda"
    for name in cpu.weights:
        assert gpu.weights[name] == pytest.approx(cpu.weights[name], rel=1e-5)
    torch.testing.assert_close(
        gpu.flat.cpu(), cpu.flat, rtol=1e-2 if dtype.itemsize == 2 else 1e-5, atol=1e-6
    )


def test_auto_resolves_to_cuda() -> None:
    assert resolve_device("auto").type == "cuda"
