"""`none`: the forget gradient alone, as the seed's GradientWeightingMethodNone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import NoWeighting

from ._method import Method


def weights(
    spec: NoWeighting, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    return torch.tensor([1.0 if n == "forget" else 0.0 for n in names], dtype=torch.float64), None


METHOD = Method(NoWeighting, weights=weights, closed_form=True, permutation_invariant=False)
