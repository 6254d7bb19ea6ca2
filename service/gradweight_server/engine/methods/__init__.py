"""One file per method: each maps the gram (float64, CPU) to one weight per group.

A weighting function never touches the gradients; the shared passes in `engine.passes` do that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from gradweight.methods import MethodSpec

from . import munba, nash, none, simple

WeightFn = Callable[[Any, torch.Tensor | None, Sequence[str], Any], tuple[torch.Tensor, Any]]

REGISTRY: dict[str, WeightFn] = {
    "none": none.weights,
    "simple": simple.weights,
    "munba": munba.weights,
    "nash": nash.weights,
}


def weighting(spec: MethodSpec) -> WeightFn:
    return REGISTRY[spec.name]
