"""`krum`: torchjd's KrumWeighting on our gram (it reads only the pairwise distances)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import InvalidGradients
from gradweight.methods import Krum

from ._method import Method


def weights(
    spec: Krum, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import KrumWeighting

    assert gram is not None
    k = len(names)
    if k < spec.n_byzantine + 3:
        raise InvalidGradients(
            f"krum with n_byzantine={spec.n_byzantine} needs at least {spec.n_byzantine + 3} groups, got {k}"
        )
    if spec.n_selected > k:
        raise InvalidGradients(f"krum: n_selected={spec.n_selected} exceeds the {k} groups")
    return KrumWeighting(n_byzantine=spec.n_byzantine, n_selected=spec.n_selected)(gram), None


METHOD = Method(
    Krum, weights=weights, requires=("torchjd",), torchjd="KrumWeighting", warm_up={"n_byzantine": 0}
)
