"""`fairgrad`: torchjd's FairGradWeighting (scipy least squares) on our gram."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import FairGrad

from ._method import Method


def weights(
    spec: FairGrad, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import FairGradWeighting

    assert gram is not None
    return FairGradWeighting(alpha=spec.alpha, max_iters=spec.max_iters)(gram), None


METHOD = Method(
    FairGrad,
    weights=weights,
    requires=("torchjd", "numpy", "scipy"),
    torchjd="FairGradWeighting",
    warm_up={"alpha": 1.0},
)
