"""`cagrad`: torchjd's CAGradWeighting (cvxpy, Clarabel) on our gram."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import CAGrad

from ._method import CVXPY_CLARABEL, Method


def weights(
    spec: CAGrad, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import CAGradWeighting

    assert gram is not None
    return CAGradWeighting(c=spec.c, norm_eps=spec.norm_eps)(gram), None


METHOD = Method(
    CAGrad,
    weights=weights,
    requires=("torchjd", *CVXPY_CLARABEL),
    extra="cvxpy",
    torchjd="CAGradWeighting",
    warm_up={"c": 0.4},
)
