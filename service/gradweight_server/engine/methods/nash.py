"""`nash`: the exact Nash bargaining weights, the positive a with K a = 1/a.

They minimise f(a) = 1/2 a^T K a - sum(log a) over a > 0 (gradient K a - 1/a, Hessian K + diag(1/a^2),
positive definite), so the solution is unique when it exists. One group gives a = 1/|g|, two have a
closed form, more are solved by damped Newton in float64 on the correlation matrix (unit diagonal), then
unscaled. No solution exists when a gradient is zero or a nonzero non-negative combination of the
gradients vanishes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import Degenerate
from gradweight.methods import Nash

from ._method import Method

TOL = 1e-10
OPPOSED_TOL = 1e-10
MAX_ITER = 100
MAX_SCALED_WEIGHT = 1e5
NEWTON_DECREMENT_TOL = 1e-12


def residual(gram: torch.Tensor, a: torch.Tensor) -> float:
    """max_i |(K a)_i a_i - 1|: zero exactly at the Nash solution."""
    return float(((gram @ a) * a - 1.0).abs().max())


def weights(
    spec: Nash, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    assert gram is not None
    norms = torch.sqrt(torch.diagonal(gram).clamp(min=0.0))
    zero = [n for n, v in zip(names, norms.tolist()) if v == 0.0]
    if zero:
        raise Degenerate(f"nash: gradient of group {zero[0]!r} is zero; no bargaining solution exists")
    corr = gram / torch.outer(norms, norms)
    b = _closed_form(corr) if len(names) == 2 else _newton(corr)
    a = b / norms
    if spec.max_norm is not None:
        norm = math.sqrt(max(float(a @ gram @ a), 0.0))
        if norm > spec.max_norm:
            a = a * (spec.max_norm / norm)
    return a, None


def _closed_form(corr: torch.Tensor) -> torch.Tensor:
    c = float(corr[0, 1])
    if 1.0 + c <= OPPOSED_TOL:
        raise Degenerate(f"nash: the gradients are opposed (cosine {c:.6g}); no bargaining solution exists")
    b = 1.0 / math.sqrt(1.0 + c)
    return torch.tensor([b, b], dtype=torch.float64)


def _newton(corr: torch.Tensor) -> torch.Tensor:
    k = corr.shape[0]
    b = torch.ones(k, dtype=torch.float64)

    def objective(x: torch.Tensor) -> float:
        return float(0.5 * x @ corr @ x - torch.log(x).sum())

    f = objective(b)
    for _ in range(MAX_ITER):
        grad = corr @ b - 1.0 / b
        if float(((corr @ b) * b - 1.0).abs().max()) <= TOL:
            return b
        hess = corr + torch.diag(1.0 / (b * b))
        step = -torch.linalg.solve(hess, grad)
        neg = step < 0
        t = min(1.0, 0.99 * float((-b[neg] / step[neg]).min())) if bool(neg.any()) else 1.0
        slope = float(grad @ step)
        while t > 1e-12:
            candidate = b + t * step
            f_new = objective(candidate)
            # Armijo; once the Newton decrement (-slope) is below rounding of f, take the step as is:
            # in the quadratic-convergence region a sufficient decrease is no longer measurable
            if f_new <= f + 1e-4 * t * slope or -slope <= NEWTON_DECREMENT_TOL:
                break
            t *= 0.5
        else:
            break
        b, f = candidate, f_new
        if float(b.max()) > MAX_SCALED_WEIGHT:
            break
    raise Degenerate(
        "nash: no bargaining solution: a non-negative combination of the gradients (nearly) vanishes, "
        "so no direction improves every group"
    )


METHOD = Method(Nash, weights=weights)
