"""The two memory-bound passes every method shares: the gram and the combine.

Neither concatenates nor stacks the gradient lists, and both are exact to their rounding and deterministic:
the same inputs give the same bytes whatever the thread count, whichever thread runs them and however the
tensors lie in memory. Both use only elementwise torch operations, each a single IEEE operation per element
(a copy that widens, a product, a sum), and small GEMMs that one thread computes whole, so how torch splits
them across threads cannot change a bit; no torch reduction over a long tensor, whose partial sums follow
the thread count, is on the path.

A group is first reduced to its flat runs (`flat_runs`): consecutive tensors that lie back to back in one
storage become one view, so a group read from a request body costs a few calls whatever its tensor count.
Both passes then walk the groups in stretches of a fixed width (`chunks`); a stretch spanning many small
tensors is filled with one `torch.cat`, not one copy per tensor.

The gram: each stretch of the k groups is copied into a k x lanes float64 scratch (exact widening). On the
CPU the scratch is cut into blocks of `CPU_BATCH` lanes and one batched matmul gives every block's k x k
partial gram (each a small float64 GEMM that one thread computes whole, in the kernel's fixed order); the
partials are added block-wise into a lanes/CPU_BATCH x k x k accumulator and folded pairwise at the end.
Products of inputs up to float32 are exact in float64, so each entry is within about
(CPU_BATCH + numel / lanes + log2 lanes) float64 roundings of its exact value relative to sqrt(K_ii K_jj).
We measured this 3x faster than the elementwise lane scheme (`gradweight.gram.lanes_gram`, one multiply-add
per lane and chunk), which stays the GPU's path: the two agree to float64 rounding.

The combine writes `sum_i w_i g_i` once into the flat output, stretch by stretch, as round(w_0 g_0), then
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


def flat_runs(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A group's tensors as flat pieces, in order, with consecutive ones that lie back to back in one
    storage merged into one view: a group read from a request body is one piece, so its cost does not grow
    with its tensor count. Empty tensors are dropped."""
    itemsize = tensors[0].element_size()
    sizes = [t.numel() for t in tensors]
    if not all(sizes):
        tensors = [t for t, n in zip(tensors, sizes) if n]  # an empty view's data_ptr is 0
        sizes = [n for n in sizes if n]
    ptrs = [t.data_ptr() for t in tensors]
    adjacent = [p + n * itemsize == q for p, n, q in zip(ptrs, sizes, ptrs[1:])]
    if not any(adjacent):
        return [_flat(t) for t in tensors]
    runs: list[torch.Tensor] = []
    i, count = 0, len(tensors)
    while i < count:
        j = i + 1
        head = _flat(tensors[i])
        if j < count and adjacent[i]:
            room = head.untyped_storage().nbytes() // itemsize - head.storage_offset()
            size = sizes[i]
            while j < count and adjacent[j - 1] and size + sizes[j] <= room:
                t = tensors[j]
                if t.dtype != head.dtype or not t.is_contiguous():
                    break
                size += sizes[j]
                j += 1
            if j > i + 1:
                head = head.as_strided((size,), (1,))
        runs.append(head)
        i = j
    return runs


def chunks(
    groups: Sequence[Sequence[torch.Tensor]], width: int
) -> Iterator[tuple[int, int, list[list[torch.Tensor]]]]:
    """Consecutive stretches of `width` elements of k flat groups (lists of flat pieces of the same total
    length; the pieces' boundaries may differ from group to group): (start, length, each group's pieces
    covering the stretch). Only pieces cut by a stretch's edge are sliced."""
    sizes = [[p.numel() for p in g] for g in groups]
    total = sum(sizes[0])
    cursor = [[0, 0] for _ in groups]  # per group: the piece, and the offset within it
    for start in range(0, total, width):
        n = min(width, total - start)
        parts: list[list[torch.Tensor]] = []
        for pieces, lengths, at in zip(groups, sizes, cursor):
            i, s = at
            out, want = [], n
            while want:
                left = lengths[i] - s
                if left <= want:
                    out.append(pieces[i] if s == 0 else pieces[i][s:])
                    want -= left
                    i, s = i + 1, 0
                else:
                    out.append(pieces[i][s : s + want])
                    s += want
                    want = 0
            at[0], at[1] = i, s
            parts.append(out)
        yield start, n, parts


def _fill(dst: torch.Tensor, pieces: list[torch.Tensor], stage: torch.Tensor | None) -> None:
    """Copy the pieces, end to end, into `dst` (exact: a copy at most widens); `stage`, of the pieces'
    dtype, takes a multi-piece cat first when `dst` is wider (cat's own widening is about 2x slower)."""
    if len(pieces) == 1:
        dst.copy_(pieces[0])
    elif pieces[0].dtype == dst.dtype or stage is None:
        torch.cat(pieces, out=dst)
    else:
        s = stage[: dst.numel()]
        torch.cat(pieces, out=s)
        dst.copy_(s)


def gram(groups: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The k x k gram (float64, CPU) of k groups of tensors, and its diagonal (k,).

    A NaN or infinity anywhere in a group makes its diagonal entry non-finite: the caller locates it.
    """
    k = len(groups)
    runs = [flat_runs(g) for g in groups]
    first = runs[0][0]
    if first.device.type == "cpu":
        upper = _batched_gram(runs)
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


def _batched_gram(groups: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The upper triangle (row by row) of the gram of k groups of flat pieces, by the CPU scheme of the
    module docstring; the lane count depends on k and numel only, never on threads."""
    k = len(groups)
    numel = sum(p.numel() for p in groups[0])
    cap = min(CPU_LANES, 1 << ((CPU_SCRATCH // k).bit_length() - 1), 1 << max(0, numel - 1).bit_length())
    lanes = max(CPU_BATCH, cap)
    blocks = lanes // CPU_BATCH
    x = torch.empty(k, lanes, dtype=torch.float64)
    xb = x.view(k, blocks, CPU_BATCH).transpose(0, 1)
    xt = xb.transpose(1, 2)
    acc = torch.zeros(blocks, k, k, dtype=torch.float64)
    part = torch.empty_like(acc)
    dtype = groups[0][0].dtype
    stage = torch.empty(lanes, dtype=dtype) if dtype != torch.float64 else None
    for _, n, parts in chunks(groups, lanes):
        for i, pieces in enumerate(parts):
            _fill(x[i, :n], pieces, stage)
        if n < lanes:
            x[:, n:].zero_()
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
    block = CUDA_BLOCK if out.device.type == "cuda" else CPU_BLOCK
    runs = [flat_runs(g) for g in groups]
    size = min(block, out.numel())
    tmp = torch.empty(size, dtype=work, device=out.device) if len(groups) > 1 else None
    acc = None if work == out.dtype else torch.empty(size, dtype=work, device=out.device)
    stage = torch.empty(size, dtype=in_dtype, device=out.device) if in_dtype != work else None
    for start, n, parts in chunks(runs, block):
        o = out[start : start + n]
        a = o if acc is None else acc[:n]
        _scaled_into(a, parts[0], weights[0], stage)
        for pieces, w in zip(parts[1:], weights[1:]):
            if w == 1.0 and len(pieces) == 1 and pieces[0].dtype == a.dtype:
                a.add_(pieces[0])
                continue
            assert tmp is not None
            t = tmp[:n]
            _scaled_into(t, pieces, w, stage)
            a.add_(t)
        if acc is not None:
            o.copy_(a)
    return out


def _scaled_into(
    o: torch.Tensor, pieces: list[torch.Tensor], w: float, stage: torch.Tensor | None
) -> None:
    """o = round(w x), x the pieces end to end: the seed's `w * cat(x)`, in o's dtype."""
    if len(pieces) == 1 and pieces[0].dtype == o.dtype and w != 1.0:
        torch.mul(pieces[0], w, out=o)
        return
    _fill(o, pieces, stage)
    if w != 1.0:
        o.mul_(w)


def has_non_finite(t: torch.Tensor) -> bool:
    """True when `t` holds a NaN or an infinity; one read pass and no tensor-sized temporary."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.reshape(-1))
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))
