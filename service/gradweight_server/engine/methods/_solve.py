"""The one failure policy: a method's maths failing, or a non-finite result, is Degenerate.

Methods raise what their maths raises (ValueError, a solver's error, ...) and return what they computed;
only here does that become the `degenerate` problem, for /v1/combine and /v1/weights alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from gradweight.errors import APIError, Degenerate
from gradweight.methods import MethodSpec

from ._registry import require


def _solver_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, RuntimeError, ArithmeticError]
    try:
        from qpsolvers.exceptions import QPError

        errors.append(QPError)
    except ImportError:
        pass
    try:
        from cvxpy.error import SolverError

        errors.append(SolverError)
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def _failures_degenerate(name: str) -> Iterator[None]:
    try:
        yield
    except (APIError, torch.OutOfMemoryError):
        raise
    except _solver_errors() as exc:
        raise Degenerate(f"{name}: {exc}") from None


def solve(
    spec: MethodSpec, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, Any]:
    """The method's weights, one float64 per group, and its next state; never a NaN weight."""
    method = require(spec)
    assert method.weights is not None, f"{spec.name} gives no weights"
    with _failures_degenerate(spec.name):
        w, new_state = method.weights(spec, gram, names, state)
        w = w.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if w.shape != (len(names),):
        raise Degenerate(f"{spec.name}: no weights for these gradients")
    if not bool(torch.isfinite(w).all()):
        raise Degenerate(f"{spec.name}: the weights are not finite for these inputs")
    return w, new_state


def aggregate(
    spec: MethodSpec, groups: Sequence[Sequence[torch.Tensor]], names: Sequence[str], out: torch.Tensor
) -> torch.Tensor:
    """An elementwise method's result written into `out` (the caller checks it is finite)."""
    method = require(spec)
    assert method.aggregate is not None, f"{spec.name} is not elementwise"
    with _failures_degenerate(spec.name):
        method.aggregate(spec, groups, names, out)
    return out
