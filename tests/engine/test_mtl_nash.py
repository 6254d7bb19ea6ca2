"""`nash` for any number of groups against torchjd: FairGrad(alpha=1) solves the same equation K w = 1/w
(an oracle to ~1e-8), NashMTL (the paper's sequential convex solver) agrees where it converges and
falls far short where it does not."""

from __future__ import annotations

import math

import pytest
import torch
from gradweight.methods import Nash, parse_method
from gradweight_server.engine import run, weights_from_gram
from gradweight_server.engine.methods.nash import residual

from .mtl_cases import case_seed, groups_of, matrix, names_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def nash_weights(gram: torch.Tensor) -> torch.Tensor:
    w, _ = weights_from_gram(Nash(), gram, names_for(gram.shape[0]))
    return torch.tensor(list(w.values()), dtype=torch.float64)


@pytest.mark.parametrize("k", [3, 5, 10])
def test_k_groups_equal_torchjd_fairgrad_alpha_one(k: int) -> None:
    from torchjd.aggregation import FairGradWeighting

    j = matrix(k, seed=case_seed("fairgrad-oracle", k), dtype=torch.float64)
    gram = j @ j.T
    ours = nash_weights(gram)
    oracle = FairGradWeighting(alpha=1.0)(gram).double()
    torch.testing.assert_close(ours, oracle, rtol=1e-6, atol=0)
    assert residual(gram, ours) <= 1e-10
    assert residual(gram, oracle) <= 1e-6


def two(cos: float, ratio: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(100, dtype=torch.float64, generator=gen)
    g1 /= g1.norm()
    z = torch.randn(100, dtype=torch.float64, generator=gen)
    z -= (z @ g1) * g1
    z /= z.norm()
    return torch.stack([g1, ratio * (cos * g1 + math.sqrt(1 - cos * cos) * z)])


@pytest.mark.parametrize("cos", [-0.95, -0.8, -0.5, 0.0, 0.5, 0.9])
def test_torchjd_nash_mtl_agrees_for_equal_norms(cos: float) -> None:
    from torchjd.aggregation import NashMTL

    j = two(cos, 1.0, seed=case_seed("equal", cos))
    ours = nash_weights(j @ j.T)
    theirs = NashMTL(n_tasks=2, max_norm=0).weighting(j).double()
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cos", [-0.95, -0.9, -0.8])
def test_torchjd_nash_mtl_falls_short_under_conflict_and_unequal_norms(cos: float) -> None:
    """Documents where the reference solver stops short: norms 30x apart and conflicting gradients.
    We measured relative errors of 1.1-2.2 here (and 0.4-3 at scattered moderate cases, e.g. norms 2x
    apart at cosine -0.5); 1000 iterations do not help since its stopping rule fires first.
    `nash` meets K a = 1/a to 1e-10 and |d|^2 = 2 on the same inputs."""
    from torchjd.aggregation import NashMTL

    j = two(cos, 30.0, seed=case_seed("short", cos))
    gram = j @ j.T
    ours = nash_weights(gram)
    assert residual(gram, ours) <= 1e-10
    assert float((ours @ j) @ (ours @ j)) == pytest.approx(2.0, rel=1e-9)
    theirs = NashMTL(n_tasks=2, max_norm=0, optim_niter=1000).weighting(j).double()
    rel = float(((theirs - ours).abs() / ours).max())
    assert rel > 0.5, f"NashMTL now within {rel:.2g}: update this documentation test"
    assert residual(gram, theirs) > 0.1


def test_torchjd_nash_mtl_misses_often_on_random_problems() -> None:
    """On 12 random 5-group problems (matrix(5, seed=0..11)) we measured NashMTL off by 0.8-2 (relative)
    on 7 of them, within 1e-7 on the rest; `nash` meets the residual bound on all."""
    from torchjd.aggregation import NashMTL

    misses = 0
    for seed in range(12):
        j = matrix(5, seed=seed, dtype=torch.float64)
        gram = j @ j.T
        ours = nash_weights(gram)
        assert residual(gram, ours) <= 1e-10
        theirs = NashMTL(n_tasks=5, max_norm=0).weighting(j).double()
        misses += float(((theirs - ours).abs() / ours).max()) > 0.1
    assert misses >= 3


def test_nash_mtl_adapter_matches_nash_where_it_converges() -> None:
    k = 3
    j = matrix(k, seed=0, dtype=torch.float64)  # a problem where NashMTL converges (see above)
    a = run(Nash(), groups_of(j))
    b = run(parse_method({"name": "nash_mtl", "max_norm": 0}), groups_of(j))
    for n in a.weights:
        assert b.weights[n] == pytest.approx(a.weights[n], rel=1e-4)


def test_newton_converges_on_many_random_full_rank_problems() -> None:
    """Every full-rank gram has a Nash solution; Newton must reach it at any scale (a regression: the
    Armijo test used to fail from rounding one step short of 1e-10 and report `degenerate`)."""
    gen = torch.Generator().manual_seed(2026)
    for trial in range(150):
        k = 3 + trial % 6
        j = matrix(k, seed=int(torch.randint(0, 2**31, (1,), generator=gen)), n=40, dtype=torch.float64)
        j = j * 10.0 ** float(torch.empty(1).uniform_(-4, 4, generator=gen))
        gram = j @ j.T
        w = nash_weights(gram)
        assert residual(gram, w) <= 1e-10
        assert float(w @ gram @ w) == pytest.approx(float(k), rel=1e-9)
