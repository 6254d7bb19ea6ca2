"""`mean`: w = 1/k, from the group count alone (torchjd's MeanWeighting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import Mean

from ._method import Method


def weights(
    spec: Mean, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    k = len(names)
    return torch.full((k,), 1.0 / k, dtype=torch.float64), None


METHOD = Method(Mean, weights=weights, closed_form=True, torchjd="MeanWeighting")
