"""Every torchjd-adapted method against torchjd itself, for k = 1, 2, 3, 5, 10 groups of float32 gradients.

Weights: ours (from our float64 gram of the float32 tensors) against torchjd's weighting on the float64
Gramian of the stacked matrix. Combined gradient: ours against torchjd's aggregator on the stacked
float32 matrix. Both within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from gradweight.errors import InvalidGradients
from gradweight_server.engine import run

from .mtl_cases import (
    ELEMENTWISE,
    STATELESS,
    case_seed,
    groups_of,
    matrix,
    spec_for,
    torchjd_aggregator,
    torchjd_weighting,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KS = [1, 2, 3, 5, 10]
RTOL = 1e-5


def seeded_call(spec, fn, arg):
    seed = getattr(spec, "seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    return fn(arg)


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    got, want = got.double(), want.double()
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= rtol * max(scale, 1e-30), f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", STATELESS)
def test_weights_and_combined_equal_torchjd(name: str, k: int) -> None:
    spec = spec_for(name, k)
    j = matrix(k, seed=case_seed(name, k))
    groups = groups_of(j)
    if k < spec.min_groups:
        with pytest.raises(InvalidGradients):
            run(spec, groups)
        return
    out = run(spec, groups)
    ours = torch.tensor(list(out.weights.values()), dtype=torch.float64)
    assert list(out.weights) == list(groups)
    assert out.flat.dtype == torch.float32

    j64 = j.double()
    if name == "config":  # an Aggregator only in torchjd: its result on the float64 values, as a weighting's
        from torchjd.aggregation import ConFIG

        pref = torch.tensor([spec.pref_vector[n] for n in groups], dtype=torch.float64)
        assert_close_rel(ours @ j64, ConFIG(pref)(j64))
    else:
        want_w = seeded_call(spec, torchjd_weighting(spec, k), j64 @ j64.T if spec.needs_gram else j64)
        assert_close_rel(ours, want_w)
        if name == "random":  # seeded randomness: the same draws, so the same weights to rounding
            assert_close_rel(ours, want_w, rtol=1e-15)

    want_vec = seeded_call(spec, torchjd_aggregator(spec, k), j)
    assert want_vec.dtype == torch.float32
    assert_close_rel(out.flat, want_vec)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_equal_torchjd(name: str, k: int) -> None:
    """No weights; the result equals torchjd's aggregator on the stacked float32 matrix (GradDrop's uniform
    draws are torchjd's own for the same seed, so every coordinate keeps the same groups)."""
    spec = spec_for(name, k)
    j = matrix(k, seed=case_seed(name, k))
    out = run(spec, groups_of(j))
    assert out.weights is None
    assert out.gram is None
    want = seeded_call(spec, torchjd_aggregator(spec, k), j)
    assert_close_rel(out.flat, want, rtol=1e-6)
    if name == "graddrop":
        kept = (out.flat != 0) == (want != 0)
        assert bool(kept.all())
