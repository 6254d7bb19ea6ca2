"""CUDA inputs: results come back on the inputs' device (skipped without a GPU)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from gradweight import Client, RemoteWeighting

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("layout", ["flat", "params"])
def test_cuda_inputs_full_and_gram(live_server: Any, layout: str) -> None:
    f = [torch.randn(300, 7, device="cuda"), torch.randn(11, device="cuda")]
    r = [torch.randn(300, 7, device="cuda"), torch.randn(11, device="cuda")]
    with Client(live_server.url) as c:
        full = c.combine(f, r, "nash", layout=layout)  # type: ignore[arg-type]
        gram = c.combine(f, r, "nash", layout=layout, mode="gram")  # type: ignore[arg-type]
    a = full.scaled_grad if layout == "flat" else torch.cat([t.reshape(-1) for t in full.tensors])
    b = gram.scaled_grad if layout == "flat" else torch.cat([t.reshape(-1) for t in gram.tensors])
    assert a.device.type == "cuda"
    assert b.device.type == "cuda"
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_remote_weighting_on_accelerator(live_server: Any) -> None:
    f, r = [torch.randn(50)], [torch.randn(50)]
    with Client(live_server.url) as c:
        out = RemoteWeighting(c, "munba").weight_grads(f, r, SimpleNamespace(device=torch.device("cuda:0")))
    assert out.device.type == "cuda"
    assert out.shape == (50, 1)
