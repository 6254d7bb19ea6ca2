"""The client's result types: what a call gives back, typed, without any server dependency."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict

# torch.Tensor or numpy.ndarray: torch is optional, so the alias stays loose for the type checker.
Array: TypeAlias = Any
Layout: TypeAlias = Literal["flat", "params"]
Mode: TypeAlias = Literal["full", "gram"]


@dataclass(frozen=True, slots=True)
class CombineResult:
    """One combine: the weighted gradient plus what the server reported about it.

    `scaled_grad` is the flat vector (layout="flat"); `params` holds one tensor per key in its shape, in
    gradient order (layout="params"). Arrays are torch tensors on the inputs' device when the inputs were
    torch tensors, numpy arrays otherwise; they may be views of one reply buffer. `weights` is None for
    the elementwise methods (their spec's `gives_weights` is False).
    """

    weights: dict[str, float] | None
    method: dict[str, Any]
    scaled_grad: Array | None = None
    params: dict[str, Array] = field(default_factory=dict)
    gram: list[list[float]] | None = None
    device: str = ""
    timing: dict[str, float] = field(default_factory=dict)
    state: str | None = None
    request_id: str | None = None
    mode: Mode = "full"

    @property
    def tensors(self) -> list[Array]:
        """The per-key tensors in gradient order (layout="params")."""
        return list(self.params.values())


@dataclass(frozen=True, slots=True)
class FileResult:
    """`combine_safetensors`: the reply as the safetensors file it is, checked, and what it reports.

    `data` is the whole file (write it to disk as is); `tensors` maps each tensor's name to its dtype (the
    protocol's names: "float32", ...) and shape, in request order; `weights` is None for the elementwise
    methods."""

    data: memoryview
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    weights: dict[str, float] | None
    method: dict[str, Any]
    gram: list[list[float]] | None = None
    device: str = ""
    timing: dict[str, float] = field(default_factory=dict)
    state: str | None = None
    request_id: str | None = None

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())


@dataclass(frozen=True, slots=True)
class WeightsResult:
    """The answer of /v1/weights: the filled-in method spec, one weight per group, the next state."""

    method: dict[str, Any]
    weights: dict[str, float]
    state: str | None = None
    request_id: str | None = None


class MethodInfo(BaseModel):
    """One entry of GET /v1/methods; unknown fields from newer servers are kept, not rejected."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    summary: str = ""
    reference: str = ""
    options: dict[str, Any] = {}
    needs_gram: bool = True
    groups: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Liveness (/healthz) and readiness (/readyz): a server warming up is live but not ready."""

    live: bool
    ready: bool
    detail: dict[str, Any] = field(default_factory=dict)
