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

    def block(m: torch.Tensor) -> torch.Tensor:
        p = 0.5 * (1.0 + m.sum(dim=0) / m.abs().sum(dim=0))
        u = torch.rand(p.shape, generator=gen, dtype=m.dtype, device=m.device)
        # the sign kept per coordinate: +1 where P > U, -1 where P < U, 0 on a tie or an all-zero column
        # (P NaN); g_i keeps its coordinate iff g_i s > 0, and sum_i relu(g_i s) s is torchjd's
        # sum_i M_i g_i bit for bit (the same magnitudes summed in the same order), in three passes
        s = torch.sign(p - u).nan_to_num_(0.0)
        signed = m * s
        if keep is None:
            return signed.relu_().sum(dim=0).mul_(s)
        return ((keep + (1 - keep) * (signed > 0)) * m).sum(dim=0)

    elementwise.run(groups, names, out, block)


METHOD = Method(GradDrop, aggregate=aggregate, torchjd="GradDrop")
