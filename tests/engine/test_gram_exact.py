"""The gram is exact to float64 rounding, and the methods' precision follows from it.

References are computed independently of the engine: each gram entry as the correctly rounded sum
(`math.fsum`) of the float64 products, exact for float32 and narrower inputs; the seed's formulas on it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gradweight import gram as client_gram
from gradweight.errors import InvalidGradients
from gradweight.methods import Munba, Nash, NoWeighting, Simple
from gradweight.tensors import as_group
from gradweight_server.engine import check_gram, run, weights_from_gram
from gradweight_server.engine.methods import nash
from gradweight_server.engine.passes import gram

GRAM_TOL = 1e-12


def exact_gram(groups: list[list[torch.Tensor]]) -> np.ndarray:
    flats = [np.concatenate([t.double().reshape(-1).numpy() for t in g]) for g in groups]
    k = len(flats)
    out = np.empty((k, k))
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = math.fsum(flats[i] * flats[j])
    return out


def relative_error(got: torch.Tensor, want: np.ndarray) -> float:
    d = np.sqrt(np.diag(want))
    return float((np.abs(got.numpy() - want) / np.outer(d, d)).max())


def badly_scaled(dtype: torch.dtype, seed: int) -> list[list[torch.Tensor]]:
    """Three groups over tensors of very different sizes, one tensor 1e4 larger than the rest; group 1 at
    cosine ~1 - 1e-7 to group 0, group 2 at cosine ~1e-4."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [200_003, 7, 65_536, 1, 31_415]
    base = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    base[2] *= 1e4
    near = [b + 3e-4 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in base]
    ortho = [torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in base]
    ortho[2] *= 1e4
    return [[t.to(dtype) for t in g] for g in (base, near, ortho)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gram_within_1e12_of_exact_on_badly_scaled_inputs(dtype: torch.dtype) -> None:
    groups = badly_scaled(dtype, seed=1)
    want = exact_gram(groups)
    k_matrix, diag = gram(groups)
    assert k_matrix.dtype == torch.float64
    assert torch.equal(k_matrix, k_matrix.T)
    assert torch.equal(diag, k_matrix.diagonal())
    c = want[0, 1] / math.sqrt(want[0, 0] * want[1, 1])
    assert c > 1 - 1e-6  # the cases the issue names: cosines near 1 and near 0
    assert abs(want[0, 2]) / math.sqrt(want[0, 0] * want[2, 2]) < 1e-2
    assert relative_error(k_matrix, want) <= GRAM_TOL


def test_float32_dots_would_fail_the_bound() -> None:
    """The bound is a real test: per-tensor float32 dot products (the former pass) miss it here."""
    groups = badly_scaled(torch.float32, seed=2)
    want = exact_gram(groups)
    f32 = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            f32[i, j] = sum(float(torch.dot(a, b)) for a, b in zip(groups[i], groups[j]))
    assert relative_error(f32, want) > 100 * GRAM_TOL
    assert relative_error(gram(groups)[0], want) <= GRAM_TOL


@pytest.mark.slow
def test_gram_bound_at_four_million_parameters() -> None:
    gen = torch.Generator().manual_seed(3)
    sizes = [1_500_000, 3, 1_000_000, 1_500_000]
    r = [torch.randn(n, generator=gen) for n in sizes]
    f = [0.999 * t + 0.05 * torch.randn(t.shape, generator=gen) for t in r]
    r[1] = r[1] * 1e4
    groups = [r, f]
    assert relative_error(gram(groups)[0], exact_gram(groups)) <= GRAM_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gram_mode_gram_and_weights_agree_with_full_mode(dtype: torch.dtype) -> None:
    """Gram mode's host gram (numpy lanes for numpy input, the server's batched GEMMs for torch input) and
    the server's CPU gram are both within the bound of exact, so the weights agree to 1e-12; the lanes
    (numpy) path sums in another order than the server's, and is checked here too."""
    groups = badly_scaled(dtype, seed=8)
    want = exact_gram(groups)
    if dtype != torch.bfloat16:  # numpy has no bfloat16
        host = [as_group([t.numpy() for t in g], "g") for g in groups]
        assert relative_error(torch.tensor(client_gram.gram(host), dtype=torch.float64), want) <= GRAM_TOL
    local = torch.tensor(client_gram.gram([as_group(g, "g") for g in groups]), dtype=torch.float64)
    assert relative_error(local, want) <= GRAM_TOL
    assert relative_error(gram(groups)[0], want) <= GRAM_TOL
    named = dict(zip(("retain", "forget"), groups[:2]))
    full = run(Nash(), named).weights
    local_k = client_gram.gram([as_group(g, "g") for g in groups[:2]])
    local_w = weights_from_gram(Nash(), local_k, list(named))[0]
    for name in named:
        assert abs(local_w[name] - full[name]) <= 1e-12 * abs(full[name])


def seed_munba_weights64(k: np.ndarray) -> tuple[float, float]:
    """The seed's formula, as its source writes it, in float64."""
    k11, k12, k22 = float(k[0, 0]), float(k[0, 1]), float(k[1, 1])
    a_r = math.sqrt((2 * k11 * k22 + k12 * math.sqrt(k11 * k22)) / (k11**2 * k22 - k11 * k12**2))
    return a_r, (1 - k11 * a_r**2) / (k12 * a_r)


@pytest.mark.parametrize("cos", [0.99, 0.3, -0.7])
def test_munba_within_1e9_of_the_seed_formula_in_float64(cos: float) -> None:
    gen = torch.Generator().manual_seed(4)
    sizes = [300_000, 17, 120_000]
    r = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    z = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
    f = [(cos * a + math.sqrt(1 - cos * cos) * b).float() for a, b in zip(r, z)]
    retain = [t.float() * 3.0 for t in r]
    out = run(Munba(), {"retain": retain, "forget": f})
    want = seed_munba_weights64(exact_gram([retain, f]))
    for got, w in zip((out.weights["retain"], out.weights["forget"]), want):
        assert abs(got - w) <= 1e-9 * abs(w)


@pytest.mark.parametrize("k", [2, 4])
def test_nash_residual_against_the_exact_gram_for_float32_inputs(k: int) -> None:
    gen = torch.Generator().manual_seed(5)
    sizes = [250_000, 9, 50_000]
    common = [torch.randn(n, generator=gen) for n in sizes]
    groups = {
        f"g{i}": [(0.6 * c + torch.randn(c.shape, generator=gen)) * (1 + 4 * i) for c in common]
        for i in range(k)
    }
    out = run(Nash(), groups)
    exact = torch.from_numpy(exact_gram(list(groups.values())))
    a = torch.tensor(list(out.weights.values()), dtype=torch.float64)
    assert nash.residual(exact, a) <= 1e-10


def literal_seed_simple(
    forget: list[torch.Tensor], retain: list[torch.Tensor], fw: float, rw: float
) -> torch.Tensor:
    """GradientWeightingMethodSimple.weight_grads, in the inputs' dtype, as the seed computes it."""
    return fw * torch.cat([g.view(-1) for g in forget]) + rw * torch.cat([g.view(-1) for g in retain])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("fw", "rw"), [(0.3, 1.0), (1.0, 1.0), (-0.7, 2.3), (1.0, 0.1)])
def test_none_and_simple_give_the_seeds_bits(dtype: torch.dtype, fw: float, rw: float) -> None:
    gen = torch.Generator().manual_seed(6)
    sizes = [(300, 701), (5,), (1000, 333)]  # blocks and tails that are no multiple of a vector width
    forget = [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]
    retain = [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]
    out = run(Simple(forget_weight=fw, retain_weight=rw), {"retain": retain, "forget": forget})
    assert torch.equal(out.flat, literal_seed_simple(forget, retain, fw, rw))
    none = run(NoWeighting(), {"retain": retain, "forget": forget})
    assert torch.equal(none.flat, torch.cat([g.view(-1) for g in forget]))


def float32_gram(k: int, seed: int) -> torch.Tensor:
    """J Jᵀ in float32 with the two triangles summed in different orders, as a trainer's may be."""
    j = torch.randn(k, 3000, generator=torch.Generator().manual_seed(seed))
    j *= torch.logspace(0, 2, k).reshape(k, 1)
    out = torch.empty(k, k)
    for a in range(k):
        for b in range(k):
            x, y = (j[a], j[b]) if a <= b else (j[a].flip(0), j[b].flip(0))
            out[a, b] = torch.dot(x, y)
    return out


@pytest.mark.parametrize("k", [5, 10])
def test_weights_accept_grams_formed_in_float32(k: int) -> None:
    grams = [float32_gram(k, s) for s in range(20)]
    assert any(not torch.equal(g, g.T) for g in grams)  # float32 rounding: not bit-symmetric
    for g in grams:
        m = check_gram(g.tolist(), k)
        assert torch.equal(m, m.T)


def test_weights_accept_a_rank_deficient_float32_gram() -> None:
    j = torch.randn(3, 500, generator=torch.Generator().manual_seed(7))
    j = torch.cat([j, j[:1] * 0.5 + j[1:2] * 2.0, j[2:] * 3.0])
    check_gram((j @ j.T).tolist(), 5)


@pytest.mark.parametrize(
    ("gram_rows", "message"),
    [
        ([[4.0, 1.0], [1.01, 9.0]], r"not symmetric: .* = 0\.00167"),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 1e-5], [0.0, 0.0, 1.0]], r"not symmetric: .* = 1e-05"),
        ([[1.0, 1.01], [1.01, 1.0]], r"not positive semi-definite: .* is -0\.01"),
        ([[0.0, 1e-3], [1e-3, 1.0]], r"not positive semi-definite"),
        ([[-1e-9, 0.0], [0.0, 1.0]], r"not positive semi-definite: K_00"),
    ],
)
def test_weights_refuse_real_asymmetry_and_indefinite_grams(
    gram_rows: list[list[float]], message: str
) -> None:
    with pytest.raises(InvalidGradients, match=message):
        check_gram(gram_rows, len(gram_rows))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cuda_gram_is_exact_and_repeatable(dtype: torch.dtype) -> None:
    groups = badly_scaled(dtype, seed=9)
    on_gpu = [[t.cuda() for t in g] for g in groups]
    first, again = gram(on_gpu)[0], gram(on_gpu)[0]
    assert torch.equal(first, again)
    assert relative_error(first, exact_gram(groups)) <= GRAM_TOL
    assert client_gram.gram([as_group(g, "g") for g in on_gpu]) == first.tolist()
