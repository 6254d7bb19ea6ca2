"""`pcgrad`: torchjd's PCGradWeighting on our gram; `seed` seeds its random projection order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import PCGrad

from ._method import Method
from ._torchjd import seeded


def weights(
    spec: PCGrad, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import PCGradWeighting

    assert gram is not None
    with seeded(spec.seed):
        return PCGradWeighting()(gram), None


METHOD = Method(
    PCGrad, weights=weights, requires=("torchjd",), torchjd="PCGradWeighting", permutation_invariant=False
)
