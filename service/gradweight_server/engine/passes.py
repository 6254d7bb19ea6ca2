"""The two memory-bound passes every method shares: the gram and the combine.

Neither concatenates nor stacks the gradient lists, and both are exact to their rounding and deterministic:
the same inputs give the same bytes whatever the thread count, whichever thread runs them and however the
tensors lie in memory. Both use only elementwise torch operations, each a single IEEE operation per element
(a copy that widens, a product, a sum), and small GEMMs that one thread computes whole, so how torch splits
them across threads cannot change a bit; no torch reduction over a long tensor, whose partial sums follow
the thread count, is on the path. Groups are walked as flat runs in fixed stretches (`gradweight.blocks`),
so a group read from a request body costs a few calls whatever its tensor count.

The gram: on the CPU `gradweight.blocks.blocked_gram` (batched float64 GEMMs over an exactly widened
scratch), on the GPU the elementwise lane scheme of `gradweight.gram.lanes_gram`; the two agree to float64
rounding.

The combine writes `sum_i w_i g_i` once into the flat output, stretch by stretch, as round(w_0 g_0), then
round(acc + round(w_i g_i)) for each further group: for two groups the seed's `fw * cat(f) + rw * cat(r)`
bit for bit. Inputs narrower than float32 are summed in float32 and rounded once into the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from gradweight.blocks import CUDA_BLOCK, blocked_combine, blocked_gram, chunks, flat_runs
from gradweight.gram import TorchLanes, lanes_for, lanes_gram


def _triu(k: int) -> tuple[list[int], list[int]]:
    rows, cols = torch.triu_indices(k, k).tolist()
    return rows, cols


def gram(groups: Sequence[Sequence[torch.Tensor]], threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The k x k gram (float64, CPU) of k groups of tensors, and its diagonal (k,); on the CPU `threads`
    share its stretches (`gradweight.blocks.share`), with the same bytes.

    A NaN or infinity anywhere in a group makes its diagonal entry non-finite: the caller locates it.
    """
    k = len(groups)
    runs = [flat_runs(g) for g in groups]
    first = runs[0][0]
    if first.device.type == "cpu":
        upper = blocked_gram(runs, threads)
    else:
        numel = sum(p.numel() for p in runs[0])
        keys = (
            [p[0] if len(p) == 1 else torch.cat(p) for p in parts] for _, _, parts in chunks(runs, CUDA_BLOCK)
        )
        ops = TorchLanes(
            lanes_for(k, numel, cuda=True), first.device, exact_products=first.dtype != torch.float64
        )
        upper = torch.tensor(lanes_gram(keys, k, ops), dtype=torch.float64)
    rows, cols = _triu(k)
    out = torch.zeros(k, k, dtype=torch.float64)
    out[rows, cols] = upper
    out[cols, rows] = upper
    return out, out.diagonal().clone()


def combine(
    groups: Sequence[Sequence[torch.Tensor]], weights: Sequence[float], out: torch.Tensor, threads: int = 1
) -> torch.Tensor:
    """Write `sum_i weights[i] * flat(groups[i])` into the flat `out` once and return it
    (`gradweight.blocks.blocked_combine`: summed in `out`'s dtype when that is float32 or wider and at
    least the inputs' width, else in float32 and rounded once into `out`)."""
    return blocked_combine([flat_runs(g) for g in groups], weights, out, threads)


def has_non_finite(t: torch.Tensor) -> bool:
    """True when `t` holds a NaN or an infinity; one read pass and no tensor-sized temporary."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.reshape(-1))
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))
