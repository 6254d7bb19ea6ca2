"""`aligned_mtl`: torchjd's AlignedMTLWeighting on our gram."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import AlignedMTL

from ._method import Method
from ._torchjd import pref_tensor


def weights(
    spec: AlignedMTL, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import AlignedMTLWeighting

    assert gram is not None
    weighting = AlignedMTLWeighting(pref_tensor(spec, spec.pref_vector, names), scale_mode=spec.scale_mode)
    return weighting(gram), None


METHOD = Method(AlignedMTL, weights=weights, requires=("torchjd",), torchjd="AlignedMTLWeighting")
