"""`graddrop`: torchjd's GradDrop (identity f), per coordinate, through the elementwise pass (no weights).

P = (1 + sum_i g_i / sum_i |g_i|) / 2 is the positive sign's purity; with U uniform in [0, 1) per
coordinate, group i keeps its coordinate when (P > U and g_i > 0) or (P < U and g_i < 0), and otherwise
only its `leak` fraction. U is drawn in the compute dtype, coordinate order, from a generator on the
output's device seeded with `seed`: on CPU exactly torchjd's `torch.manual_seed(seed); GradDrop(...)`.
P is computed with torchjd's own float32 sums, bit for bit (see `elementwise.ALIGN`), so every coordinate
compares the same P with the same U and keeps the same groups. Those draws are torch's serial generator,
about 6 ms per million coordinates on one CPU core whatever k: several times the memory floor at small k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from gradweight.methods import GradDrop

from .. import elementwise
from ..elementwise import SEQUENTIAL_ROWS, column_sum, row_sum
from ..passes import has_non_finite
from ._method import Method
from ._torchjd import SEED_MODULUS, by_group


def aggregate(
    spec: GradDrop, groups: Sequence[Sequence[torch.Tensor]], names: Sequence[str], out: torch.Tensor
) -> None:
    dtype = elementwise.compute_dtype(groups[0][0].dtype)
    leak = by_group(spec, "leak", spec.leak, names)
    keep = None if leak is None else leak.to(device=out.device, dtype=dtype).reshape(-1, 1)
    gen = torch.Generator(device=out.device)
    if spec.seed is None:
        gen.seed()
    else:
        gen.manual_seed(spec.seed % SEED_MODULUS)

    k = len(names)
    big = torch.finfo(dtype).max
    scratch: list[torch.Tensor] = []

    def buffers(b: int, like: torch.Tensor) -> list[torch.Tensor]:
        """k x b scratch, four b-vectors and a constant one: allocated once, reused by every block."""
        if not scratch or scratch[0].numel() < k * b:
            half = like.new_full((b,), 0.5)
            scratch[:] = [like.new_empty(k * b), *(like.new_empty(b) for _ in range(4)), half]
        return [scratch[0][: k * b].view(k, b)] + [v[:b] for v in scratch[1:]]

    def block(stack: torch.Tensor, out: torch.Tensor) -> bool:
        return columns(stack, list(stack), out)

    def rows(rows: list[torch.Tensor], out: torch.Tensor) -> bool:
        return columns(None, rows, out)

    def columns(stack: torch.Tensor | None, rows: list[torch.Tensor], out: torch.Tensor) -> bool:
        """One block in five passes over its k rows (|g|, two sums, the clamp, its sum) into reused
        scratch; stack is None up to SEQUENTIAL_ROWS groups, whose rows are read in place and summed row
        by row (as torch's sums add so few rows), and every sum rounds as torchjd's do."""
        b = out.shape[0]
        tmp, p, u, lo, hi, half = buffers(b, out)

        def total(m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return column_sum(m, out) if stack is not None else row_sum(list(m), out)

        if stack is not None:
            torch.abs(stack, out=tmp)
        else:
            for t, r in zip(tmp, rows):
                torch.abs(r, out=t)
        magnitude = total(tmp, out)  # out is free until the last pass
        if has_non_finite(magnitude):  # a NaN or an infinity in a column reaches its sum of |g_i|
            return True
        sums = column_sum(stack, p) if stack is not None else row_sum(rows, p)
        # 0.5 + 0.5 (S / A) in one op: torchjd's 0.5 (1 + S / A) to the bit (halving is exact)
        torch.addcdiv(half, sums, magnitude, value=0.5, out=p)
        torch.rand(b, generator=gen, dtype=out.dtype, device=out.device, out=u)
        # g_i keeps its coordinate where P > U and g_i > 0 or P < U and g_i < 0 (neither on a tie or in
        # an all-zero column, P NaN); clamped into [0, big] where P > U, [-big, 0] where P < U and [0, 0]
        # otherwise, the kept values stay and the others become 0
        torch.gt(p, u, out=hi).mul_(big)
        torch.lt(p, u, out=lo).mul_(-big)
        if keep is None:
            if stack is not None:
                torch.clamp(stack, min=lo, max=hi, out=tmp)
            else:
                for t, r in zip(tmp, rows):
                    torch.clamp(r, min=lo, max=hi, out=t)
            total(tmp, out)  # in row order: torchjd's sum_i M_i g_i
            return False
        m = stack if stack is not None else torch.stack(rows)
        kept = torch.clamp(m, min=lo, max=hi, out=tmp).ne_(0)
        torch.mul(m, keep + (1 - keep) * kept, out=tmp)
        total(tmp, out)
        return False

    if k <= SEQUENTIAL_ROWS:
        elementwise.run_rows(groups, names, out, rows)
    else:
        elementwise.run(groups, names, out, block)


METHOD = Method(GradDrop, aggregate=aggregate, torchjd="GradDrop")
