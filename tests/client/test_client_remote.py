"""RemoteWeighting returns what the seed's classes return; apply_grads writes `.grad` fields."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from gradweight import Client, RemoteWeighting, apply_grads


def _cat(gs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in gs]).double()


def seed(name: str, forget: list[torch.Tensor], retain: list[torch.Tensor]) -> torch.Tensor:
    """The seed's three formulas (vision_unlearning.utils.gradient_weighting), float64."""
    if name == "none":
        return _cat(forget)
    if name == "simple":
        return _cat(forget) + _cat(retain)
    g = torch.stack([_cat(retain), _cat(forget)])
    k = g @ g.T
    k11, k12, k22 = k[0, 0], k[0, 1], k[1, 1]
    a_r = torch.sqrt((2 * k11 * k22 + k12 * torch.sqrt(k11 * k22)) / (k11**2 * k22 - k11 * k12**2))
    a_f = (1 - k11 * a_r**2) / (k12 * a_r)
    return g.T @ torch.stack([a_r, a_f]).reshape(2, 1)


@pytest.mark.parametrize("name", ["none", "simple", "munba"])
@pytest.mark.parametrize("mode", ["full", "gram"])
def test_matches_seed_shape_and_values(live_server: Any, name: str, mode: str) -> None:
    forget = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    retain = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    with Client(live_server.url) as c:
        rw = RemoteWeighting(c, name, mode=mode)  # type: ignore[arg-type]
        out = rw.weight_grads(forget, retain, accelerator)
    want = seed(name, forget, retain)
    assert out.shape == want.shape == ((23, 1) if name == "munba" else (23,))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)
    assert rw.last is not None
    assert rw.last.weights


def test_none_skips_retain_upload_and_accelerator_none(live_server: Any) -> None:
    forget = [torch.randn(4)]
    with Client(live_server.url) as c:
        out = RemoteWeighting(c, "none").weight_grads(forget, [torch.randn(4)], None)
    assert out.device == forget[0].device
    torch.testing.assert_close(out, forget[0])


def test_apply_grads() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    flat = torch.arange(n, dtype=torch.float64).reshape(n, 1)  # the seed's munba column, another dtype
    apply_grads(params, flat)
    assert params[0].grad is not None
    assert params[0].grad.dtype == torch.float32
    assert params[0].grad.shape == params[0].shape
    assert params[1].grad[0] == 6.0
    apply_grads(params, [torch.ones_like(p) for p in params])
    assert all(bool((p.grad == 1).all()) for p in params)
    with pytest.raises(ValueError, match="elements"):
        apply_grads(params, torch.zeros(n + 1))


def test_stateful_method_carries_state(live_server: Any) -> None:
    with Client(live_server.url) as c:
        names = {m.name for m in c.methods()}
        if "gradvac" not in names:
            pytest.skip("no stateful method on this server")
        rw = RemoteWeighting(c, "gradvac")
        states = []
        for _ in range(3):
            rw.weight_grads([torch.randn(6)], [torch.randn(6)], None)
            states.append(rw.state)
    assert all(s is not None for s in states)
    assert len(set(states)) > 1
