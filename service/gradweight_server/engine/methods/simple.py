"""`simple`: fixed weights, as the seed's GradientWeightingMethodSimple."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import Simple

from ._method import Method


def weights(
    spec: Simple, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    by_name = {"retain": spec.retain_weight, "forget": spec.forget_weight}
    return torch.tensor([by_name[n] for n in names], dtype=torch.float64), None


METHOD = Method(Simple, weights=weights, closed_form=True, permutation_invariant=False)
