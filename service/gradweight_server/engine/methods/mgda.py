"""`mgda`: torchjd's MGDAWeighting (Frank-Wolfe) on our gram."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import MGDA

from ._method import Method


def weights(
    spec: MGDA, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import MGDAWeighting

    assert gram is not None
    return MGDAWeighting(epsilon=spec.epsilon, max_iters=spec.max_iters)(gram), None


METHOD = Method(MGDA, weights=weights, requires=("torchjd",), torchjd="MGDAWeighting")
