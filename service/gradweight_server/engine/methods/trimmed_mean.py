"""`trimmed_mean`: torchjd's TrimmedMean, per coordinate, through the elementwise pass (no weights).

Each block of coordinates is sorted across the k groups, the trim_number lowest and highest dropped and
the rest averaged: torchjd's `sort(dim=0)`, `narrow` and `mean(dim=0)` on the same values, block by block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from gradweight.errors import InvalidGradients
from gradweight.methods import TrimmedMean

from .. import elementwise
from ._method import Method


def aggregate(
    spec: TrimmedMean, groups: Sequence[Sequence[torch.Tensor]], names: Sequence[str], out: torch.Tensor
) -> None:
    k, t = len(names), spec.trim_number
    if k < 2 * t + 1:
        raise InvalidGradients(
            f"trimmed_mean with trim_number={t} needs at least {2 * t + 1} groups, got {k}"
        )

    def block(stack: torch.Tensor) -> torch.Tensor:
        if t == 0:
            return stack.mean(dim=0)
        return torch.sort(stack, dim=0).values.narrow(0, t, k - 2 * t).mean(dim=0)

    elementwise.run(groups, names, out, block)


METHOD = Method(TrimmedMean, aggregate=aggregate, torchjd="TrimmedMean", warm_up={"trim_number": 1})
