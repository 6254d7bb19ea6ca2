"""What a method file declares: its spec, how it computes, and what the server needs to run it.

Every public module of this package holds one method and a `METHOD = Method(...)` built from its own
functions; `_registry` collects them, so adding a method is one file here plus its spec class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from gradweight.methods import MethodSpec

WeightFn = Callable[[Any, torch.Tensor | None, Sequence[str], Any], tuple[torch.Tensor, Any]]
"""(spec, gram or None, group names, state) -> (one float64 weight per group, next state)."""

AggregateFn = Callable[[Any, Sequence[Sequence[torch.Tensor]], Sequence[str], torch.Tensor], None]
"""(spec, groups' tensors, group names, flat out) -> None: writes the elementwise result into `out`."""

QUADPROG = ("numpy", "qpsolvers", "quadprog")
CVXPY_ECOS = ("numpy", "cvxpy", "ecos")
CVXPY_CLARABEL = ("numpy", "cvxpy", "clarabel")


@dataclass(frozen=True)
class Method:
    """One method. Exactly one of `weights` (from the gram, or from the group count when the spec does
    not need the gram) and `aggregate` (elementwise, from the gradients themselves) is set, unless the
    method is listed but never served (`unavailable` says why)."""

    spec: type[MethodSpec]
    weights: WeightFn | None = None
    aggregate: AggregateFn | None = None
    requires: tuple[str, ...] = ()
    """Modules beyond the base install (torchjd's `_REQUIRED_DEPS` for the torchjd-backed ones)."""
    extra: str | None = None
    """The gradweight-server extra that installs `requires` (`pip install 'gradweight-server[extra]'`)."""
    torchjd: str | None = None
    """The torchjd 0.18 class the method adapts or reproduces (the oracle the tests compare with)."""
    permutation_invariant: bool = True
    """Reordering the groups reorders the weights and leaves the combined gradient unchanged."""
    closed_form: bool = False
    """Its weights are a formula of a small gram (microseconds): POST /v1/weights computes them on the
    event loop rather than pay the hop to the compute thread (about half a millisecond)."""
    warm_up: Mapping[str, Any] = field(default_factory=dict)
    """Options for the warm-up call: the required ones, which have no default to warm up with."""
    unavailable: str | None = None

    @property
    def name(self) -> str:
        return str(self.spec.model_fields["name"].default)

    def check(self) -> None:
        """The declaration is consistent with its spec (run once, at import)."""
        served = self.unavailable is None
        if served and (self.weights is None) == (self.aggregate is None):
            raise TypeError(f"method {self.name!r} must declare exactly one of weights / aggregate")
        if self.aggregate is not None and (self.spec.gives_weights or self.spec.needs_gram):
            raise TypeError(f"elementwise method {self.name!r}: its spec must give no weights, need no gram")
        if self.weights is not None and not self.spec.gives_weights:
            raise TypeError(f"method {self.name!r} computes weights but its spec says it gives none")
