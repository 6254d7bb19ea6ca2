"""`graddrop`: torchjd's GradDrop (identity f), per coordinate, through the elementwise pass (no weights).

P = (1 + sum_i g_i / sum_i |g_i|) / 2 is the positive sign's purity; with U uniform in [0, 1) per
coordinate, group i keeps its coordinate when (P > U and g_i > 0) or (P < U and g_i < 0), and otherwise
only its `leak` fraction. U is drawn in the compute dtype, coordinate order, from a generator on the
output's device seeded with `seed`: on CPU exactly torchjd's `torch.manual_seed(seed); GradDrop(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from gradweight.methods import GradDrop

from .. import elementwise
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

    big = torch.finfo(dtype).max
    scratch: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def block(m: torch.Tensor, out: torch.Tensor) -> bool:
        b = m.shape[1]
        if b not in scratch:
            scratch[b] = (torch.empty_like(m), m.new_empty(b), m.new_empty(b))
        tmp, p, lo = scratch[b]
        magnitude = torch.sum(torch.abs(m, out=tmp), dim=0, out=out)  # out is free until the last pass
        if has_non_finite(magnitude):  # a NaN or an infinity in a column reaches its sum of |g_i|
            return True
        torch.sum(m, dim=0, out=p).div_(magnitude).add_(1.0).mul_(0.5)
        u = torch.rand(b, generator=gen, dtype=m.dtype, device=m.device)
        # the sign kept per coordinate: +1 where P > U, -1 where P < U, 0 on a tie or an all-zero column
        # (P NaN); g_i keeps its coordinate iff g_i s > 0
        s = torch.sub(p, u, out=u).sign_().nan_to_num_(0.0)
        if keep is not None:
            torch.mul(m, s, out=tmp)
            torch.mul(m, keep + (1 - keep) * (tmp > 0), out=tmp)
            torch.sum(tmp, dim=0, out=out)
            return False
        # g_i clamped into [0, big] where s = 1, [-big, 0] where s = -1, [0, 0] where s = 0: the kept
        # values stay, the others become 0, and the sum in row order is torchjd's sum_i M_i g_i
        torch.clamp(s, max=0.0, out=lo).mul_(big)
        hi = s.clamp_(min=0.0).mul_(big)
        torch.sum(torch.clamp(m, min=lo, max=hi, out=tmp), dim=0, out=out)
        return False

    elementwise.run(groups, names, out, block)


METHOD = Method(GradDrop, aggregate=aggregate, torchjd="GradDrop")
