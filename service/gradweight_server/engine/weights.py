"""Weights from a gram alone, for POST /v1/weights (the trainer keeps its gradients)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gradweight.errors import InvalidGradients, InvalidMethod
from gradweight.methods import MethodSpec

from .methods import solve

ROUNDING_TOL = 1e-6


def check_gram(gram: Sequence[Sequence[float]] | torch.Tensor, k: int) -> torch.Tensor:
    """The gram as float64, symmetrised; InvalidGradients unless finite, k x k, symmetric and positive
    semi-definite up to float32 rounding.

    Both tolerances are relative to sqrt(K_ii K_jj), the scale of entry (i, j), so a gram that a trainer
    (or torchjd's `compute_gramian`) formed in float32 passes and one with a real asymmetry or a clearly
    negative direction does not; the detail gives the measured deviation. The checks run in numpy, whose
    operations on a few numbers cost a microsecond where torch's cost ten: this is /v1/weights' whole work.
    """
    try:
        src = gram.detach().cpu().numpy() if isinstance(gram, torch.Tensor) else gram
        m = np.array(src, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InvalidGradients("gram must be a square matrix of numbers") from None
    if m.shape != (k, k):
        raise InvalidGradients(f"gram must be {k} x {k}, got shape {list(m.shape)}")
    if not np.isfinite(m).all():
        raise InvalidGradients("gram has a non-finite entry")
    if k == 0:
        return torch.from_numpy(m)
    diag = m.diagonal().copy()
    if diag.min() < 0.0:
        i = int(diag.argmin())
        raise InvalidGradients(f"gram is not positive semi-definite: K_{i}{i} = {float(diag[i]):.6g} < 0")
    scale = np.sqrt(np.outer(diag, diag))
    asym = np.abs(m - m.T)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(asym == 0.0, 0.0, asym / scale)
    worst = float(rel.max())
    if worst > ROUNDING_TOL:
        raise InvalidGradients(
            f"gram is not symmetric: max |K_ij - K_ji| / sqrt(K_ii K_jj) = {worst:.3g} "
            f"(tolerance {ROUNDING_TOL:g})"
        )
    sym = (m + m.T) / 2
    null = diag == 0.0
    if (sym[null] != 0.0).any():
        i = int(np.flatnonzero(null)[0])
        raise InvalidGradients(
            f"gram is not positive semi-definite: K_{i}{i} = 0 but row {i} has a nonzero entry"
        )
    inv = np.where(null, 1.0, 1.0 / np.sqrt(np.where(null, 1.0, diag)))
    lowest = float(np.linalg.eigvalsh(sym * np.outer(inv, inv)).min())
    if lowest < -ROUNDING_TOL * k:
        raise InvalidGradients(
            "gram is not positive semi-definite: the smallest eigenvalue of K_ij / sqrt(K_ii K_jj) is "
            f"{lowest:.3g} (tolerance {-ROUNDING_TOL * k:.3g})"
        )
    return torch.from_numpy(sym)


def weights_from_gram(
    spec: MethodSpec, gram: Sequence[Sequence[float]] | torch.Tensor, names: Sequence[str], state: Any = None
) -> tuple[dict[str, float], Any]:
    """Validate `gram` (rows and columns in `names` order) and return the weights by group name."""
    if not spec.gives_weights:
        raise InvalidMethod(f"method {spec.name!r} is elementwise: it needs the gradients, not a gram")
    k_matrix = check_gram(gram, len(names))
    w, new_state = solve(spec, k_matrix, names, state)
    return dict(zip(names, (float(v) for v in w))), new_state
