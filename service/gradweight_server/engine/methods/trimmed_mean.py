"""`trimmed_mean`: torchjd's TrimmedMean, per coordinate, through the elementwise pass (no weights).

Each block of coordinates is sorted across the k groups, the trim_number lowest and highest dropped and
the rest averaged, as torchjd's `sort(dim=0)`, `narrow` and `mean(dim=0)`. The sort is Batcher's odd-even
merge network of elementwise min/max over the k rows (exact: it moves values, never rounds them), about 8x
faster than `torch.sort` along the short axis on CPU; past NETWORK_MAX_GROUPS groups `torch.sort` is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from gradweight.errors import InvalidGradients
from gradweight.methods import TrimmedMean

from .. import elementwise
from ._method import Method

NETWORK_MAX_GROUPS = 128


@cache
def batcher(n: int) -> tuple[tuple[int, int], ...]:
    """The comparators (i < j) of Batcher's odd-even merge sort for n inputs (any n)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def sorted_rows(stack: torch.Tensor, spare: torch.Tensor) -> list[torch.Tensor]:
    """The rows of `stack` sorted per column (views of `stack` and `spare`, which are overwritten)."""
    rows = list(stack)
    free = spare
    for i, j in batcher(len(rows)):
        a, b = rows[i], rows[j]
        torch.minimum(a, b, out=free)
        torch.maximum(a, b, out=b)
        rows[i], free = free, a
    return rows


def aggregate(
    spec: TrimmedMean, groups: Sequence[Sequence[torch.Tensor]], names: Sequence[str], out: torch.Tensor
) -> None:
    k, t = len(names), spec.trim_number
    if k < 2 * t + 1:
        raise InvalidGradients(
            f"trimmed_mean with trim_number={t} needs at least {2 * t + 1} groups, got {k}"
        )
    kept = k - 2 * t
    scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def block(stack: torch.Tensor) -> torch.Tensor:
        if t == 0:
            return stack.mean(dim=0)
        if k > NETWORK_MAX_GROUPS:
            return torch.sort(stack, dim=0).values.narrow(0, t, kept).mean(dim=0)
        b = stack.shape[1]
        if b not in scratch:
            scratch[b] = (stack.new_empty(b), stack.new_empty(kept, b))
        spare, middle = scratch[b]
        for dst, src in zip(middle, sorted_rows(stack, spare)[t : k - t]):
            dst.copy_(src)
        return middle.mean(dim=0)

    elementwise.run(groups, names, out, block)


METHOD = Method(TrimmedMean, aggregate=aggregate, torchjd="TrimmedMean", warm_up={"trim_number": 1})
