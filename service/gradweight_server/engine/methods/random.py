"""`random`: random loss weighting, softmax of k standard normal draws (torchjd's RandomWeighting).

With `seed` the draws come from a CPU generator seeded with it, in float64: the same weights as
`torch.manual_seed(seed); torchjd.aggregation.Random()` on a float64 matrix. Without, from the global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import Random

from ._method import Method
from ._torchjd import SEED_MODULUS


def weights(
    spec: Random, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    gen = None if spec.seed is None else torch.Generator().manual_seed(spec.seed % SEED_MODULUS)
    z = torch.randn(len(names), generator=gen, dtype=torch.float64)
    return torch.softmax(z, dim=-1), None


METHOD = Method(Random, weights=weights, closed_form=True, torchjd="Random", permutation_invariant=False)
