"""The elementwise pass, beside gram and combine: for methods whose result is not a combination of whole
gradients (trimmed mean sorts k values per coordinate, GradDrop masks by sign per coordinate).

The groups are read block by block into one reused k x b stack (b coordinates of every group, a few MiB,
so it stays in cache), the method maps the stack to b results, and those are written once into the flat
output. Nothing k x N is ever built. A non-finite input is reported, not aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from gradweight.errors import NonFinite

from .passes import has_non_finite

CPU_STACK = 1 << 20
CUDA_STACK = 1 << 26
WIDE = (torch.float32, torch.float64)

BlockFn = Callable[[torch.Tensor], torch.Tensor]
"""k x b stack (compute dtype) -> the b results of those coordinates."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The inputs' own dtype when float32/float64 (as torchjd computes), float32 for half types."""
    return dtype if dtype in WIDE else torch.float32


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
    width = max(1, (CUDA_STACK if out.device.type == "cuda" else CPU_STACK) // k)
    largest = max(t.numel() for t in groups[0])
    buf = torch.empty(k * min(width, largest), dtype=dtype, device=out.device)
    offset = 0
    for key, tensors in enumerate(zip(*groups, strict=True)):
        flats = [t.reshape(-1) for t in tensors]
        n = flats[0].numel()
        for s in range(0, n, width):
            b = min(width, n - s)
            stack = buf[: k * b].view(k, b)
            for row, f in zip(stack, flats):
                row.copy_(f[s : s + b])
            if has_non_finite(stack):
                _raise_non_finite(tensors, names, keys[key] if keys is not None else str(key))
            out[offset + s : offset + s + b].copy_(fn(stack))
        offset += n
    return out


def _raise_non_finite(tensors: Sequence[torch.Tensor], names: Sequence[str], key: str) -> None:
    name = next((n for n, t in zip(names, tensors) if has_non_finite(t)), names[0])
    raise NonFinite(f"group {name!r} key {key!r} contains NaN or infinity")
