"""The two memory-bound passes every method shares: the gram and the combine.

Neither concatenates nor stacks the gradient lists: the gram is summed from per-tensor dot products
(float32 or wider, totals in float64) and the combine writes `sum_i w_i g_i` once into a preallocated flat
output, block by block so that the second touch of each output block hits cache on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CPU_BLOCK = 1 << 18
CUDA_BLOCK = 1 << 26
CUDA_SCRATCH = 1 << 24
UPCAST_CHUNK = 1 << 20
PAIRWISE_MAX_GROUPS = 4
WIDE = (torch.float32, torch.float64)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _triu(k: int) -> tuple[list[int], list[int]]:
    rows, cols = torch.triu_indices(k, k).tolist()
    return rows, cols


def gram(groups: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The k x k gram (float64, CPU) of k groups of tensors, and each key's diagonal (keys x k).

    The per-key diagonal locates a non-finite value without another pass: a NaN or infinity anywhere in a
    tensor makes its squared norm non-finite.
    """
    k = len(groups)
    rows, cols = _triu(k)
    dtype = groups[0][0].dtype
    pairwise = dtype in WIDE and k <= PAIRWISE_MAX_GROUPS
    per_key: list[torch.Tensor] = []
    for tensors in zip(*groups, strict=True):
        flats = [_flat(t) for t in tensors]
        if pairwise:
            per_key.append(torch.stack([torch.dot(flats[i], flats[j]) for i, j in zip(rows, cols)]))
        else:
            per_key.append(_chunked_triu(flats, rows, cols))
    totals = torch.stack(per_key).to(device="cpu", dtype=torch.float64)
    upper = totals.sum(0)
    out = torch.zeros(k, k, dtype=torch.float64)
    out[rows, cols] = upper
    out[cols, rows] = upper
    diag_idx = [n for n, (i, j) in enumerate(zip(rows, cols)) if i == j]
    return out, totals[:, diag_idx]


def _chunked_triu(flats: Sequence[torch.Tensor], rows: list[int], cols: list[int]) -> torch.Tensor:
    """Upper triangle of one key's gram via k x chunk matmuls, upcast to at least float32."""
    acc = torch.float64 if flats[0].dtype == torch.float64 else torch.float32
    n = flats[0].numel()
    chunk = max(1, UPCAST_CHUNK // len(flats))
    total = torch.zeros(len(flats), len(flats), dtype=torch.float64, device=flats[0].device)
    for s in range(0, n, chunk):
        m = torch.stack([f[s : s + chunk] for f in flats]).to(acc)
        total += (m @ m.T).to(torch.float64)
    return total[rows, cols]


def combine(
    groups: Sequence[Sequence[torch.Tensor]], weights: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """Write `sum_i weights[i] * flat(groups[i])` into the flat `out` once and return it.

    When `out` is narrower than float32 (or narrower than the inputs) each block is summed in float32 and
    rounded once, so accumulation never drops below float32.
    """
    in_dtype = groups[0][0].dtype
    direct = out.dtype in WIDE and out.dtype.itemsize >= in_dtype.itemsize
    block = CUDA_BLOCK if out.device.type == "cuda" else CPU_BLOCK
    largest = max(t.numel() for t in groups[0])
    size = min(largest, CUDA_SCRATCH if out.device.type == "cuda" else block)
    tmp = torch.empty(size if direct and len(groups) > 1 else 0, dtype=out.dtype, device=out.device)
    offset = 0
    for tensors in zip(*groups, strict=True):
        flats = [_flat(t) for t in tensors]
        n = flats[0].numel()
        for s in range(0, n, block):
            e = min(n, s + block)
            o = out[offset + s : offset + e]
            if direct:
                _axpy_into(o, [f[s:e] for f in flats], weights, tmp)
            else:
                o.copy_(_axpy_wide([f[s:e] for f in flats], weights))
        offset += n
    return out


def _axpy_into(o: torch.Tensor, xs: Sequence[torch.Tensor], ws: Sequence[float], tmp: torch.Tensor) -> None:
    """o = sum_i ws[i] * xs[i], each product rounded before it is added, as the seed's
    `w_f * f + w_r * r` is: `add(alpha=)` fuses the multiply-add and can differ in the last bit."""
    if ws[0] == 1.0:
        o.copy_(xs[0])
    else:
        torch.mul(xs[0], ws[0], out=o)
    n = o.numel()
    for x, w in zip(xs[1:], ws[1:]):
        if w == 1.0:
            o.add_(x)
            continue
        for s in range(0, n, tmp.numel()):
            e = min(n, s + tmp.numel())
            o[s:e].add_(torch.mul(x[s:e], w, out=tmp[: e - s]))


def _axpy_wide(xs: Sequence[torch.Tensor], ws: Sequence[float]) -> torch.Tensor:
    wide = torch.promote_types(xs[0].dtype, torch.float32)
    acc = torch.mul(xs[0].to(wide), ws[0])
    for x, w in zip(xs[1:], ws[1:]):
        acc.add_(x.to(wide), alpha=w)
    return acc


def has_non_finite(t: torch.Tensor) -> bool:
    """True when `t` holds a NaN or an infinity; one read pass and no tensor-sized temporary."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.reshape(-1))
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))
