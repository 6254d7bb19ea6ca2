"""`imtl_g`: torchjd's IMTLGWeighting on our gram."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import IMTLG

from ._method import Method


def weights(
    spec: IMTLG, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    from torchjd.aggregation import IMTLGWeighting

    assert gram is not None
    return IMTLGWeighting()(gram), None


METHOD = Method(IMTLG, weights=weights, requires=("torchjd",), torchjd="IMTLGWeighting")
