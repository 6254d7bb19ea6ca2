"""`upgrad`: torchjd's UPGradWeighting (quadprog) on our gram."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import DualProj, UPGrad

from ._method import QUADPROG, Method
from ._torchjd import pref_tensor


def projector(spec: UPGrad | DualProj) -> Any:
    from torchjd._linalg import QuadprogProjector

    return QuadprogProjector(norm_eps=spec.norm_eps, reg_eps=spec.reg_eps)


def weights(
    spec: UPGrad, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import UPGradWeighting

    assert gram is not None
    return UPGradWeighting(pref_tensor(spec, spec.pref_vector, names), projector=projector(spec))(gram), None


METHOD = Method(UPGrad, weights=weights, requires=("torchjd", *QUADPROG), torchjd="UPGradWeighting")
