"""`constant`: fixed weights by group name, for any number of groups (torchjd's ConstantWeighting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import InvalidMethod
from gradweight.methods import Constant

from ._method import Method
from ._torchjd import by_group


def weights(
    spec: Constant, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    w = by_group(spec, "weights", spec.weights, names)
    if w is None:
        raise InvalidMethod("constant: `weights` is required")
    return w, None


METHOD = Method(
    Constant,
    weights=weights,
    closed_form=True,
    torchjd="Constant",
    warm_up={"weights": {"a": 1.0, "b": 0.5, "c": 2.0}},
)
