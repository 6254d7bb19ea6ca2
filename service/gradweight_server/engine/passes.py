"""The two memory-bound passes every method shares: the gram and the combine.

Neither concatenates nor stacks the gradient lists, and both are exact to their rounding and deterministic:
the same inputs give the same bytes whatever the thread count and whichever thread runs them. Both use only
elementwise torch operations, each a single IEEE operation per element (a copy that widens, a product, a
sum), so how torch splits them across threads cannot change a bit; no BLAS call and no torch reduction over
a long tensor, whose partial sums follow the thread count, is on the path.

The gram: the k groups are streamed, key after key, into a k x lanes float64 scratch (exact widening; no
concatenation). On the CPU each full scratch is cut into blocks of `CPU_BATCH` lanes and one batched
matmul gives every block's k x k partial gram (each a small float64 GEMM that one thread computes whole,
in the kernel's fixed order); the partials are added block-wise into a lanes/CPU_BATCH x k x k accumulator
and folded pairwise at the end. Products of inputs up to float32 are exact in float64, so each entry is
within about (CPU_BATCH + numel / lanes + log2 lanes) float64 roundings of its exact value relative to
sqrt(K_ii K_jj), and how torch splits the copies and the batches across threads changes no bit. We measured
this 3x faster than the elementwise lane scheme (`gradweight.gram.lanes_gram`, one multiply-add per lane
and chunk), which stays the GPU's path and the client's gram mode: the two agree to float64 rounding.

The combine writes `sum_i w_i g_i` once into the flat output, block by block, as round(w_0 g_0), then
round(acc + round(w_i g_i)) for each further group: for two groups the seed's `fw * cat(f) + rw * cat(r)`
bit for bit. Inputs narrower than float32 are summed in float32 and rounded once into the output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from gradweight.gram import TorchLanes, lanes_for, lanes_gram

CPU_BLOCK = 1 << 18
CPU_LANES = 1 << 16  # k = 2: 1 MiB of float64 scratch; fewer lanes for more groups (CPU_SCRATCH)
CPU_SCRATCH = 1 << 17  # lanes x k at most
CPU_BATCH = 1 << 10  # the GEMM's reduction length per block
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
    keys = ([_flat(t) for t in tensors] for tensors in zip(*groups, strict=True))
    numel = sum(t.numel() for t in first)
    if device.type == "cpu":
        upper = _batched_gram(keys, k, numel)
    else:
        lanes = lanes_for(k, numel, cuda=True)
        ops = TorchLanes(lanes, device, exact_products=first[0].dtype != torch.float64)
        upper = torch.tensor(lanes_gram(keys, k, ops), dtype=torch.float64)
    rows, cols = _triu(k)
    out = torch.zeros(k, k, dtype=torch.float64)
    out[rows, cols] = upper
    out[cols, rows] = upper
    return out, out.diagonal().clone()


def _batched_gram(keys: Iterator[list[torch.Tensor]], k: int, numel: int) -> torch.Tensor:
    """The upper triangle (row by row) of the gram, by the CPU scheme of the module docstring; the lane
    count depends on k and numel only, never on threads."""
    cap = min(CPU_LANES, 1 << ((CPU_SCRATCH // k).bit_length() - 1), 1 << max(0, numel - 1).bit_length())
    lanes = max(CPU_BATCH, cap)
    blocks = lanes // CPU_BATCH
    x = torch.empty(k, lanes, dtype=torch.float64)
    xb = x.view(k, blocks, CPU_BATCH).transpose(0, 1)
    xt = xb.transpose(1, 2)
    acc = torch.zeros(blocks, k, k, dtype=torch.float64)
    part = torch.empty_like(acc)
    fill = 0
    for flats in keys:
        n = flats[0].numel()
        s = 0
        while s < n:
            take = min(lanes - fill, n - s)
            for i, f in enumerate(flats):
                x[i, fill : fill + take].copy_(f[s : s + take])
            fill, s = fill + take, s + take
            if fill == lanes:
                acc.add_(torch.bmm(xb, xt, out=part))
                fill = 0
    if fill:
        x[:, fill:].zero_()
        acc.add_(torch.bmm(xb, xt, out=part))
    width = blocks
    while width > 1:
        half = width // 2
        acc[:half].add_(acc[half:width])
        width = half
    rows, cols = _triu(k)
    return acc[0][rows, cols]


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
