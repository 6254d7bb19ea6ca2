"""`nash`: the exact Nash bargaining solution, K a = 1/a, against its residual and torchjd's oracles."""

from __future__ import annotations

import math

import pytest
import torch
from gradweight.errors import Degenerate
from gradweight.methods import Munba, Nash
from gradweight_server.engine import run, weights_from_gram
from gradweight_server.engine.methods.nash import residual

from .reference import gram64, pair, random_shapes, seed_munba_weights


def nash_residual(groups: list[list[torch.Tensor]], w: torch.Tensor) -> float:
    return residual(gram64(groups), w)


@pytest.mark.parametrize("seed", range(8))
def test_two_groups_meet_the_nash_condition(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cos = float(torch.rand(1, generator=gen)) * 1.9 - 0.95
    shapes = [(5, 7), *random_shapes(20, gen)]
    forget, retain = pair(shapes, cos, gen, torch.float64, scale_r=3.0, scale_f=0.02)
    out = run(Nash(), {"retain": retain, "forget": forget})
    w = torch.tensor([out.weights["retain"], out.weights["forget"]], dtype=torch.float64)
    assert (w > 0).all()
    assert nash_residual([retain, forget], w) <= 1e-9
    # at the solution the combined gradient's squared norm is the number of groups
    assert float(out.flat.double() @ out.flat.double()) == pytest.approx(2.0, rel=1e-9)


def test_closed_form_from_the_issue() -> None:
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    k = g @ g.T
    krr, krf, kff = float(k[0, 0]), float(k[0, 1]), float(k[1, 1])
    s = math.sqrt(krr * kff)
    a_r = math.sqrt(s / (krr * (s + krf)))
    a_f = 1 / ((s + krf) * a_r)
    got, _ = weights_from_gram(Nash(), k, ["retain", "forget"])
    assert got["retain"] == pytest.approx(a_r, rel=1e-12)
    assert got["forget"] == pytest.approx(a_f, rel=1e-12)


@pytest.mark.parametrize("cos", [-0.9, -0.7, -0.3, 0.2, 0.62])
def test_seed_munba_fails_the_nash_condition(cos: float) -> None:
    """Documents why `nash` exists: the seed's closed form meets only the first Nash equation
    (both only at cosine -0.5)."""
    gen = torch.Generator().manual_seed(100)
    forget, retain = pair([(40,)], cos, gen, torch.float64)
    w = seed_munba_weights(forget, retain)
    k = gram64([retain, forget])
    first, second = (k @ w) * w
    assert float(first) == pytest.approx(1.0, rel=1e-9)
    assert abs(float(second) - 1.0) > 0.05
    out = run(Munba(), {"retain": retain, "forget": forget})
    assert (
        nash_residual([retain, forget], torch.tensor(list(out.weights.values()), dtype=torch.float64)) > 0.05
    )


def test_seed_munba_is_nash_only_at_cosine_minus_half() -> None:
    forget, retain = pair([(40,)], -0.5, torch.Generator().manual_seed(1), torch.float64)
    assert nash_residual([retain, forget], seed_munba_weights(forget, retain)) <= 1e-9


@pytest.mark.parametrize("k", [3, 5, 10, 16])
def test_many_groups_newton_meets_residual(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    base = torch.randn(k, 300, generator=gen, dtype=torch.float64)
    scales = torch.logspace(-3, 3, k, dtype=torch.float64)
    groups = {f"task{i}": [(base[i] * scales[i]).reshape(3, 100)] for i in range(k)}
    out = run(Nash(), groups)
    w = torch.tensor(list(out.weights.values()), dtype=torch.float64)
    assert (w > 0).all()
    assert residual(gram64([g for g in groups.values()]), w) <= 1e-10
    assert float(out.flat @ out.flat) == pytest.approx(float(k), rel=1e-9)


def test_many_groups_match_two_group_closed_form_when_k_is_two() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 64, generator=gen, dtype=torch.float64)
    k = g @ g.T
    from gradweight_server.engine.methods import nash

    corr = k / torch.outer(k.diagonal().sqrt(), k.diagonal().sqrt())
    torch.testing.assert_close(nash._newton(corr), nash._closed_form(corr), rtol=1e-10, atol=0)


def test_max_norm_rescales() -> None:
    gen = torch.Generator().manual_seed(1)
    forget, retain = pair([(100,)], 0.3, gen, torch.float64)
    out = run(Nash(max_norm=0.5), {"retain": retain, "forget": forget})
    assert float(out.flat.norm()) == pytest.approx(0.5, rel=1e-12)
    out = run(Nash(max_norm=10.0), {"retain": retain, "forget": forget})
    assert float(out.flat.norm()) == pytest.approx(math.sqrt(2), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_two_groups_equal_torchjd_fairgrad_alpha_one(seed: int) -> None:
    from torchjd.aggregation import FairGradWeighting

    gen = torch.Generator().manual_seed(200 + seed)
    g = torch.randn(2, 30, generator=gen, dtype=torch.float64) * torch.rand(
        2, 1, generator=gen, dtype=torch.float64
    )
    k = g @ g.T
    ours, _ = weights_from_gram(Nash(), k, ["retain", "forget"])
    oracle = FairGradWeighting(alpha=1.0)(k)
    torch.testing.assert_close(
        torch.tensor(list(ours.values()), dtype=torch.float64), oracle.double(), rtol=1e-8, atol=0
    )


def test_opposed_and_zero_gradients_are_degenerate() -> None:
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(64, generator=gen)
    with pytest.raises(Degenerate, match="opposed"):
        run(Nash(), {"retain": [r], "forget": [-2 * r]})
    with pytest.raises(Degenerate, match="zero"):
        run(Nash(), {"retain": [r], "forget": [torch.zeros(64)]})
    # three groups whose non-negative combination vanishes: g1 + g2 + g3 = 0
    a, b = torch.randn(2, 64, generator=gen, dtype=torch.float64)
    with pytest.raises(Degenerate, match="no bargaining solution"):
        run(Nash(), {"a": [a], "b": [b], "c": [-(a + b)]})
