"""The elementwise pass, beside gram and combine: for methods whose result is not a combination of whole
gradients (trimmed mean sorts k values per coordinate, GradDrop masks by sign per coordinate).

The groups are read block by block into one reused k x b stack (b coordinates of every group, spanning
tensor boundaries: one `torch.cat` per group fills a row however small the tensors), the method writes the
b results straight into the flat output, and every op of a method runs on rows or on the whole stack, so
a block costs a few calls whatever the tensor count. On CPU the stack is about 1 MiB (a few MiB past 16
groups, so that rows stay long enough to amortise torch's per-call cost), as every method makes several
passes over it; its width depends on k only, never on the thread count. Nothing k x N is ever built. A
non-finite input is reported, not aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from gradweight.errors import NonFinite

from .passes import has_non_finite

CPU_STACK = 1 << 18  # 1 MiB of float32
CPU_MIN_WIDTH = 1 << 14  # narrower rows cost more in per-op overhead (~2 us a call) than L2 saves
CUDA_STACK = 1 << 26
ALIGN = 64
"""Block widths are multiples of this: torch's CPU `sum(dim=0)` adds the rows of a column in an order that
depends on where the column falls relative to the 64-column chunks it vectorises over (for 5 <= k < 32),
so aligned blocks sum every column exactly as one `sum(dim=0)` over the whole k x n matrix does."""
SEQUENTIAL_ROWS = 4
WIDE = (torch.float32, torch.float64)

BlockFn = Callable[[torch.Tensor, torch.Tensor], bool]
"""(k x b stack in the compute dtype, b-element result to write) -> whether the block may hold a NaN or an
infinity (a cheap test of the method's own sums: any non-finite input makes them non-finite). The stack
is the method's scratch: it may overwrite it."""

RowsFn = Callable[[list[torch.Tensor], torch.Tensor], bool]
"""BlockFn for `run_rows`: the block's k rows, read-only (views of the inputs where possible)."""


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

    def block(stack: torch.Tensor | None, rows: list[torch.Tensor], o: torch.Tensor) -> bool:
        assert stack is not None  # always stacked without views
        return fn(stack, o)

    return _run(groups, names, out, block, keys)


def run_rows(
    groups: Sequence[Sequence[torch.Tensor]],
    names: Sequence[str],
    out: torch.Tensor,
    fn: RowsFn,
    keys: Sequence[str] | None = None,
) -> torch.Tensor:
    """`run` for a method reading each row once: a block lying in one tensor is passed as views of the
    inputs (no copy into the stack), and fn must not write into its rows."""
    return _run(groups, names, out, lambda stack, rows, o: fn(rows, o), keys, views=True)


def _run(
    groups: Sequence[Sequence[torch.Tensor]],
    names: Sequence[str],
    out: torch.Tensor,
    fn: Callable[[torch.Tensor | None, list[torch.Tensor], torch.Tensor], bool],
    keys: Sequence[str] | None,
    views: bool = False,
) -> torch.Tensor:
    k = len(groups)
    dtype = compute_dtype(groups[0][0].dtype)
    flats = [[t.reshape(-1) for t in tensors] for tensors in groups]
    sizes = [t.numel() for t in flats[0]]
    w = min(width(k, out.device), max(sum(sizes), 1))
    buf = torch.empty(k * w, dtype=dtype, device=out.device)
    result = None if out.dtype == dtype else torch.empty(w, dtype=dtype, device=out.device)
    for start, b, pieces in _blocks(sizes, w):
        hi = 0
        for segment in _segments(pieces, views):
            lo, hi = hi, hi + sum(e - s for _, s, e in segment)
            stack = None
            if views and len(segment) == 1 and flats[0][segment[0][0]].dtype == dtype:
                i, s, e = segment[0]
                rows = [tensors[i][s:e] for tensors in flats]
            else:
                stack = buf[: k * (hi - lo)].view(k, hi - lo)
                rows = list(stack)
                for row, tensors in zip(rows, flats):
                    parts = [tensors[i][s:e] for i, s, e in segment]
                    if len(parts) > 1:
                        torch.cat(parts, out=row)
                    else:
                        row.copy_(parts[0])
            o = out[start + lo : start + hi] if result is None else result[lo:hi]
            if fn(stack, rows, o):
                _raise_non_finite(groups, names, keys, segment)
        if result is not None:
            out[start : start + b].copy_(result[:b])
    return out


def column_sum(stack: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`torch.sum(stack, dim=0, out=out)` bit for bit, as torchjd's sums over the k x n matrix round: up to
    SEQUENTIAL_ROWS rows torch adds a column's rows in order at any width, so the same adds row by row,
    a few times faster than the reduction kernel on so few rows, give the same bits."""
    if len(stack) > SEQUENTIAL_ROWS:
        return torch.sum(stack, dim=0, out=out)
    return row_sum(list(stack), out)


def row_sum(rows: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """rows[0] + rows[1] + ... into `out`, in that order."""
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)
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


def _segments(pieces: list[tuple[int, int, int]], views: bool) -> Iterator[list[tuple[int, int, int]]]:
    """A block's pieces split into the calls of fn: all at once when they are copied into the stack
    anyway; for views, each piece of at least CPU_MIN_WIDTH alone (read in place) and runs of smaller
    ones together (copied)."""
    if not views:
        yield pieces
        return
    small: list[tuple[int, int, int]] = []
    for piece in pieces:
        if piece[2] - piece[1] < CPU_MIN_WIDTH:
            small.append(piece)
            continue
        if small:
            yield small
            small = []
        yield [piece]
    if small:
        yield small


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
