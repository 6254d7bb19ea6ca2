"""`dualproj`: torchjd's DualProjWeighting (quadprog) on our gram."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import DualProj

from ._method import QUADPROG, Method
from ._torchjd import pref_tensor
from .upgrad import projector


def weights(
    spec: DualProj, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import DualProjWeighting

    assert gram is not None
    weighting = DualProjWeighting(pref_tensor(spec, spec.pref_vector, names), projector=projector(spec))
    return weighting(gram), None


METHOD = Method(DualProj, weights=weights, requires=("torchjd", *QUADPROG), torchjd="DualProjWeighting")
