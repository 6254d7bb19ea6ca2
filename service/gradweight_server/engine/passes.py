"""The two memory-bound passes every method shares: the gram and the combine.

Neither concatenates nor stacks the gradient lists, and both are exact to their rounding and deterministic:
the same inputs give the same bytes whatever the thread count and whichever thread runs them. Both use only
elementwise torch operations, each a single IEEE operation per element (a copy that widens, a product, a
sum), so how torch splits them across threads cannot change a bit; no BLAS call and no torch reduction over
a long tensor, whose partial sums follow the thread count, is on the path.

The gram: the k groups are streamed, key after key, into a k x lanes float64 scratch (exact widening), and
lane l of accumulator (i, j) adds x_i[l] x_j[l] for every chunk, a product exact in float64 for inputs up to
float32. After the last chunk the lanes are folded pairwise. So every product and sum is float64, each lane
sums numel / lanes terms in order, and each entry is within about (numel / lanes + log2 lanes) float64
roundings of its exact value relative to sqrt(K_ii K_jj). The lane schedule is the client's
(`gradweight.gram.lanes_for`), whose gram mode computes the same bytes with numpy.

The combine writes `sum_i w_i g_i` once into the flat output, block by block, as round(w_0 g_0), then
round(acc + round(w_i g_i)) for each further group: for two groups the seed's `fw * cat(f) + rw * cat(r)`
bit for bit. Inputs narrower than float32 are summed in float32 and rounded once into the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from gradweight.gram import TorchLanes, lanes_for, lanes_gram

CPU_BLOCK = 1 << 18
CUDA_BLOCK = 1 << 21  # also the size of the combine's scratch: 8 MiB of float32 on the GPU


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _triu(k: int) -> tuple[list[int], list[int]]:
    rows, cols = torch.triu_indices(k, k).tolist()
    return rows, cols


def gram(groups: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The k x k gram (float64, CPU) of k groups of tensors, and its diagonal (k,).

    A NaN or infinity anywhere in a group makes its diagonal entry non-finite: the caller locates it.
    """
    k = len(groups)
    first = groups[0]
    device = first[0].device
    lanes = lanes_for(k, sum(t.numel() for t in first), cuda=device.type == "cuda")
    ops = TorchLanes(lanes, device, exact_products=first[0].dtype != torch.float64)
    keys = ([_flat(t) for t in tensors] for tensors in zip(*groups, strict=True))
    upper = torch.tensor(lanes_gram(keys, k, ops), dtype=torch.float64)
    rows, cols = _triu(k)
    out = torch.zeros(k, k, dtype=torch.float64)
    out[rows, cols] = upper
    out[cols, rows] = upper
    return out, out.diagonal().clone()


def combine(
    groups: Sequence[Sequence[torch.Tensor]], weights: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """Write `sum_i weights[i] * flat(groups[i])` into the flat `out` once and return it.

    Summed in `out`'s dtype when that is float32 or wider and at least the inputs' width, else in float32
    (or the inputs' dtype when wider) and rounded once into `out`.
    """
    in_dtype = groups[0][0].dtype
    work = torch.promote_types(torch.promote_types(in_dtype, out.dtype), torch.float32)
    direct = work == out.dtype
    block = CUDA_BLOCK if out.device.type == "cuda" else CPU_BLOCK
    numel = sum(t.numel() for t in groups[0])
    size = min(block, numel)
    tmp = torch.empty(size, dtype=work, device=out.device) if len(groups) > 1 else None
    acc = None if direct else torch.empty(size, dtype=work, device=out.device)
    offset = 0
    for tensors in zip(*groups, strict=True):
        flats = [_flat(t) for t in tensors]
        n = flats[0].numel()
        for s in range(0, n, block):
            e = min(n, s + block)
            o = out[offset + s : offset + e]
            a = o if acc is None else acc[: e - s]
            _weighted_sum_into(a, [f[s:e] for f in flats], weights, None if tmp is None else tmp[: e - s])
            if acc is not None:
                o.copy_(a)
        offset += n
    return out


def _weighted_sum_into(
    o: torch.Tensor, xs: Sequence[torch.Tensor], ws: Sequence[float], tmp: torch.Tensor | None
) -> None:
    """o = round(w_0 x_0), then o = round(o + round(w_i x_i)): the seed's rounding, in o's dtype."""
    _scaled_into(o, xs[0], ws[0])
    for x, w in zip(xs[1:], ws[1:]):
        if w == 1.0 and x.dtype == o.dtype:
            o.add_(x)
            continue
        assert tmp is not None
        _scaled_into(tmp, x, w)
        o.add_(tmp)


def _scaled_into(o: torch.Tensor, x: torch.Tensor, w: float) -> None:
    if x.dtype != o.dtype:
        o.copy_(x)
        if w != 1.0:
            o.mul_(w)
    elif w == 1.0:
        o.copy_(x)
    else:
        torch.mul(x, w, out=o)


def has_non_finite(t: torch.Tensor) -> bool:
    """True when `t` holds a NaN or an infinity; one read pass and no tensor-sized temporary."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.reshape(-1))
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))
