"""`sum`: w = 1, from the group count alone (torchjd's SumWeighting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import Sum

from ._method import Method


def weights(
    spec: Sum, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    return torch.ones(len(names), dtype=torch.float64), None


METHOD = Method(Sum, weights=weights, closed_form=True, torchjd="SumWeighting")
