"""One file per method: each maps the gram (float64, CPU) to one weight per group.

A weighting function never touches the gradients; the shared passes in `engine.passes` do that.
torchjd's weightings are adapted by `_torchjd` (stateless ones), `gradvac` and `nash_mtl` (stateful).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from gradweight.errors import APIError, Degenerate
from gradweight.methods import MethodSpec

from . import _torchjd, gradvac, munba, nash, nash_mtl, none, simple

WeightFn = Callable[[Any, torch.Tensor | None, Sequence[str], Any], tuple[torch.Tensor, Any]]

REGISTRY: dict[str, WeightFn] = {
    "none": none.weights,
    "simple": simple.weights,
    "munba": munba.weights,
    "nash": nash.weights,
    **{name: _torchjd.weights for name in _torchjd.BUILDERS},
    "gradvac": gradvac.weights,
    "nash_mtl": nash_mtl.weights,
}


def weighting(spec: MethodSpec) -> WeightFn:
    return REGISTRY[spec.name]


def solve(
    spec: MethodSpec, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, Any]:
    """The method's weights, one per group; any failure of its maths is Degenerate, never a NaN weight."""
    try:
        w, new_state = weighting(spec)(spec, gram, names, state)
    except (APIError, torch.OutOfMemoryError):
        raise
    except (ValueError, RuntimeError, ArithmeticError) as exc:
        raise Degenerate(f"{spec.name}: {exc}") from None
    if not bool(torch.isfinite(w).all()):
        raise Degenerate(f"{spec.name}: the weights are not finite for these inputs")
    return w, new_state


def availability(spec_cls: type[MethodSpec]) -> tuple[bool, str | None]:
    """Whether the method can run on this server: (True, None), or (False, what is missing and the
    `pip install` that brings it). GET /v1/methods reports it as `available` / `unavailable_reason`."""
    return _torchjd.availability(spec_cls)


def warm_up() -> list[str]:
    """Run every available method once on a small gram so the first request does not pay for imports
    and solver set-up (quadprog, scipy, cvxpy: up to ~1 s cold). Returns the names warmed."""
    from gradweight.methods import SPEC_CLASSES, parse_method

    gram = torch.tensor([[2.0, -0.5, 0.3], [-0.5, 1.0, 0.2], [0.3, 0.2, 1.5]], dtype=torch.float64)
    names = ["a", "b", "c"]
    required: dict[str, dict[str, Any]] = {
        "cagrad": {"c": 0.4},
        "krum": {"n_byzantine": 0},
        "fairgrad": {"alpha": 1.0},
    }
    warmed = []
    for cls in SPEC_CLASSES:
        name = str(cls.model_fields["name"].default)
        if cls.group_names is not None or not availability(cls)[0]:
            continue
        spec = parse_method({"name": name, **required.get(name, {})})
        REGISTRY[name](spec, gram if cls.needs_gram else None, names, None)
        warmed.append(name)
    return warmed


__all__ = ["REGISTRY", "WeightFn", "availability", "solve", "warm_up", "weighting"]
