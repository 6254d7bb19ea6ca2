"""Weights from a gram alone, for POST /v1/weights (the trainer keeps its gradients)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import InvalidGradients, InvalidMethod
from gradweight.methods import MethodSpec

from .methods import solve

PSD_TOL = 1e-9


def check_gram(gram: Sequence[Sequence[float]] | torch.Tensor, k: int) -> torch.Tensor:
    """The gram as float64; InvalidGradients unless finite, k x k, symmetric and PSD within rounding."""
    try:
        m = torch.as_tensor(gram, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InvalidGradients("gram must be a square matrix of numbers") from None
    if m.shape != (k, k):
        raise InvalidGradients(f"gram must be {k} x {k}, got shape {list(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise InvalidGradients("gram has a non-finite entry")
    scale = float(m.diagonal().abs().max()) if k else 0.0
    if float((m - m.T).abs().max()) > PSD_TOL * max(scale, 1e-300):
        raise InvalidGradients("gram is not symmetric")
    if k and float(torch.linalg.eigvalsh(m).min()) < -PSD_TOL * max(scale, 1e-300):
        raise InvalidGradients("gram is not positive semi-definite")
    return (m + m.T) / 2


def weights_from_gram(
    spec: MethodSpec, gram: Sequence[Sequence[float]] | torch.Tensor, names: Sequence[str], state: Any = None
) -> tuple[dict[str, float], Any]:
    """Validate `gram` (rows and columns in `names` order) and return the weights by group name."""
    if not spec.gives_weights:
        raise InvalidMethod(f"method {spec.name!r} is elementwise: it needs the gradients, not a gram")
    k_matrix = check_gram(gram, len(names))
    w, new_state = solve(spec, k_matrix, names, state)
    return dict(zip(names, (float(v) for v in w))), new_state
