"""The elementwise pass, beside gram and combine: for methods whose result is not a combination of whole
gradients (trimmed mean sorts k values per coordinate, GradDrop masks by sign per coordinate).

The groups are read block by block into one reused k x b stack (b coordinates of every group, spanning
tensor boundaries: one `torch.cat` per group fills a row however small the tensors), the method writes the
b results straight into the flat output, and every op of a method runs on rows or on the whole stack, so
a block costs a few calls whatever the tensor count. On CPU the stack fits in one core's L2 cache, as
every method makes several passes over it; its width depends on k only, never on the thread count. Nothing
k x N is ever built. A non-finite input is reported, not aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from gradweight.errors import NonFinite

from .passes import has_non_finite

CPU_STACK = 1 << 18  # 1 MiB of float32
CPU_MIN_WIDTH = 1 << 12  # narrower rows cost more in per-op overhead than they save in cache misses
CUDA_STACK = 1 << 26
ALIGN = 64
"""Block widths are multiples of this: torch's CPU `sum(dim=0)` adds the rows of a column in an order that
depends on where the column falls relative to the 64-column chunks it vectorises over (for 5 <= k < 32),
so aligned blocks sum every column exactly as one `sum(dim=0)` over the whole k x n matrix does."""
WIDE = (torch.float32, torch.float64)

BlockFn = Callable[[torch.Tensor, torch.Tensor], bool]
"""(k x b stack in the compute dtype, b-element result to write) -> whether the block may hold a NaN or an
infinity (a cheap test of the method's own sums: any non-finite input makes them non-finite). The stack
is the method's scratch: it may overwrite it."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The inputs' own dtype when float32/float64 (as torchjd computes), float32 for half types."""
    return dtype if dtype in WIDE else torch.float32


def width(k: int, device: torch.device) -> int:
    """Coordinates per block: fixed by k and the device type alone (results must not depend on threads)."""
    stack = CUDA_STACK if device.type == "cuda" else CPU_STACK
    return max(CPU_MIN_WIDTH, stack // k // ALIGN * ALIGN)


def run(
    groups: Sequence[Sequence[torch.Tensor]],
    names: Sequence[str],
    out: torch.Tensor,
    fn: BlockFn,
    keys: Sequence[str] | None = None,
) -> torch.Tensor:
    """Write fn's results for every coordinate into the flat `out`, in coordinate order (so a method
    drawing random numbers per block draws them in the same order as over the whole vector)."""
    k = len(groups)
    dtype = compute_dtype(groups[0][0].dtype)
    flats = [[t.reshape(-1) for t in tensors] for tensors in groups]
    sizes = [t.numel() for t in flats[0]]
    n = sum(sizes)
    w = min(width(k, out.device), max(n, 1))
    buf = torch.empty(k * w, dtype=dtype, device=out.device)
    result = None if out.dtype == dtype else torch.empty(w, dtype=dtype, device=out.device)
    for start, b, pieces in _blocks(sizes, w):
        stack = buf[: k * b].view(k, b)
        for row, tensors in zip(stack, flats):
            parts = [tensors[i][s:e] for i, s, e in pieces]
            if len(parts) == 1:
                row.copy_(parts[0])
            else:
                torch.cat(parts, out=row)
        o = out[start : start + b] if result is None else result[:b]
        if fn(stack, o):
            _raise_non_finite(groups, names, keys, pieces)
        if result is not None:
            out[start : start + b].copy_(o)
    return out


def _blocks(sizes: Sequence[int], w: int) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """(start, width, pieces): consecutive blocks of w coordinates (the last one shorter), each made of
    pieces (tensor, start, end) of the flat tensors in order."""
    start, filled = 0, 0
    pieces: list[tuple[int, int, int]] = []
    for i, size in enumerate(sizes):
        pos = 0
        while pos < size:
            take = min(w - filled, size - pos)
            pieces.append((i, pos, pos + take))
            pos, filled = pos + take, filled + take
            if filled == w:
                yield start, filled, pieces
                start, filled, pieces = start + filled, 0, []
    if filled:
        yield start, filled, pieces


def _raise_non_finite(
    groups: Sequence[Sequence[torch.Tensor]],
    names: Sequence[str],
    keys: Sequence[str] | None,
    pieces: Sequence[tuple[int, int, int]],
) -> None:
    """NonFinite naming the first tensor of the block, and the group, holding a NaN or an infinity."""
    for i, s, e in pieces:
        for name, tensors in zip(names, groups):
            if has_non_finite(tensors[i].reshape(-1)[s:e]):
                key = keys[i] if keys is not None else str(i)
                raise NonFinite(f"group {name!r} key {key!r} contains NaN or infinity")
