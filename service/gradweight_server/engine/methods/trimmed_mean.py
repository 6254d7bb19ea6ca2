"""`trimmed_mean`: torchjd's TrimmedMean, per coordinate, through the elementwise pass (no weights).

torchjd sorts each column of the k x n matrix, drops the trim_number lowest and highest and averages the
rest. No full sort is needed for that: a comparator network (elementwise min/max of two rows, exact: it
moves values, never rounds them) that only *partitions* each column into the t lowest, the k - 2t kept
and the t highest suffices, and the kept rows are then summed and divided, as torchjd's `mean`. The
network is Batcher's odd-even merge sort or t rounds of min/max extraction (1.5 m comparators for m
values), whichever has fewer comparators once those whose outputs land in one class are pruned; past
NETWORK_MAX_GROUPS groups `torch.sort` is used. The kept values are summed in row order, not sorted order,
so the result can differ from torchjd's in the last bits (float32 rounding of the same sum; not a sum
minus the extremes, whose cancellation would round worse). With trim_number 0 the mean reads the inputs
in place, at the cost of the combine pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from gradweight.errors import InvalidGradients
from gradweight.methods import TrimmedMean

from .. import elementwise
from ..elementwise import row_sum
from ..passes import has_non_finite
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


def extremes(n: int, t: int) -> tuple[tuple[int, int], ...]:
    """t rounds of min/max extraction: round j pairs up wires j..n-1-j, then chains the pairs' lower
    values into wire j (the round's minimum) and their higher values into wire n-1-j (its maximum)."""
    pairs = []
    for j in range(t):
        wires = list(range(j, n - j))
        lows, highs = wires[0::2], wires[1::2]
        pairs += list(zip(lows, highs))
        if len(wires) % 2:  # the unpaired last wire (n-1-j) competes for both extremes
            highs.append(lows[-1])
        pairs += [(j, low) for low in lows[1:]]
        pairs += [(high, n - 1 - j) for high in highs[:-1]]
    return tuple(pairs)


def prune(pairs: Sequence[tuple[int, int]], n: int, t: int) -> tuple[tuple[int, int], ...]:
    """Drop the comparators no later comparator reads whose two outputs land in the same class (lowest t,
    kept, highest t): swapping those two values leaves every class's multiset unchanged."""

    def cls(i: int) -> int:
        return (i >= t) + (i >= n - t)

    kept: list[tuple[int, int]] = []
    read: set[int] = set()
    for i, j in reversed(pairs):
        if i in read or j in read or cls(i) != cls(j):
            kept.append((i, j))
            read.update((i, j))
    return tuple(reversed(kept))


@cache
def partition(n: int, t: int) -> tuple[tuple[int, int], ...]:
    """The comparators (i < j: the minimum goes to i) leaving the t lowest values of every column in rows
    0..t-1 and the t highest in rows n-t..n-1, in any order."""
    return min(prune(batcher(n), n, t), prune(extremes(n, t), n, t), key=len)


def partitioned_rows(stack: torch.Tensor, spare: torch.Tensor, t: int) -> list[torch.Tensor]:
    """The rows of `stack` partitioned per column (views of `stack` and `spare`, which are overwritten)."""
    rows = list(stack)
    free = spare
    for i, j in partition(len(rows), t):
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
    spares: dict[int, torch.Tensor] = {}

    def block(stack: torch.Tensor, out: torch.Tensor) -> bool:
        if has_non_finite(stack):
            return True
        if k > NETWORK_MAX_GROUPS:
            torch.mean(torch.sort(stack, dim=0).values.narrow(0, t, kept), dim=0, out=out)
            return False
        b = stack.shape[1]
        if b not in spares:
            spares[b] = stack.new_empty(b)
        spare = spares[b]
        middle = partitioned_rows(stack, spare, t)[t : k - t]
        row_sum(middle, out).div_(kept)
        return False

    def mean(rows: list[torch.Tensor], out: torch.Tensor) -> bool:
        """sum_i g_i / k as sum_i (g_i / k): no pass for the division, the same bits when k is a power of
        two, within a few float32 ulps otherwise."""
        torch.mul(rows[0], 1.0 / k, out=out)
        for row in rows[1:]:
            out.add_(row, alpha=1.0 / k)
        return False  # a NaN or an infinity reaches the mean, whose check (engine.core) refuses it

    if t == 0:  # nothing trimmed: each row is read once, straight from the inputs
        elementwise.run_rows(groups, names, out, mean)
    else:
        elementwise.run(groups, names, out, block)


METHOD = Method(TrimmedMean, aggregate=aggregate, torchjd="TrimmedMean", warm_up={"trim_number": 1})
