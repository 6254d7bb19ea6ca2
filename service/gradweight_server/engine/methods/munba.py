"""`munba`: the seed's closed form (MUNBa paper v1), kept for reproducing published numbers.

The seed computes, on K in order [retain, forget],
    a_r = sqrt((2 k11 k22 + k12 sqrt(k11 k22)) / (k11^2 k22 - k11 k12^2)),  a_f = (1 - k11 a_r^2) / (k12 a_r).
With c = k12 / sqrt(k11 k22) the first is k11 a_r^2 = (2 + c) / (1 - c^2): the same value, evaluated here
in float64 in that normalised form so it cannot overflow (the seed's k11^2 k22 overflows float32 at
|g| ~ 1e7). It satisfies only the first Nash equation; `nash` is the exact solution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import Degenerate
from gradweight.methods import Munba

from ._method import Method

COLLINEAR_TOL = 1e-12


def weights(
    spec: Munba, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    assert gram is not None
    k11, k12, k22 = (float(v) for v in (gram[0, 0], gram[0, 1], gram[1, 1]))
    if k11 <= 0.0 or k22 <= 0.0:
        raise Degenerate(f"munba: the {'retain' if k11 <= 0.0 else 'forget'} gradient is zero")
    if k12 == 0.0:
        raise Degenerate("munba: the gradients are orthogonal (k_rf = 0), the seed's formula divides by it")
    c = k12 / (math.sqrt(k11) * math.sqrt(k22))
    if 1.0 - c * c <= COLLINEAR_TOL:
        raise Degenerate(f"munba: the gradients are collinear (cosine {c:.6g}), k_rr k_ff = k_rf^2")
    a_r = math.sqrt((2.0 + c) / (k11 * (1.0 - c * c)))
    a_f = (1.0 - k11 * a_r * a_r) / (k12 * a_r)
    return torch.tensor([a_r, a_f], dtype=torch.float64), None


METHOD = Method(Munba, weights=weights, closed_form=True, permutation_invariant=False)
