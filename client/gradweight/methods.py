"""Method specs: the typed `method` object of PROTOCOL.md, shared by client and server.

A spec is a frozen pydantic model discriminated on `name`; unknown names and unknown options are errors.
Each class also says what the server needs to run it (`needs_gram`) and which groups it takes, so
`GET /v1/methods` and the client's validation read one source.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from .errors import InvalidMethod

PAIR = ("retain", "forget")


class MethodSpec(BaseModel):
    """Base of every method spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    needs_gram: ClassVar[bool] = True
    min_groups: ClassVar[int] = 2
    max_groups: ClassVar[int | None] = 2
    group_names: ClassVar[tuple[str, ...] | None] = PAIR
    stateful: ClassVar[bool] = False

    @classmethod
    def groups_info(cls) -> dict[str, Any]:
        names = list(cls.group_names) if cls.group_names else None
        return {"min": cls.min_groups, "max": cls.max_groups, "names": names}


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return v


class NoWeighting(MethodSpec):
    name: Literal["none"] = "none"
    summary: ClassVar[str] = (
        "The forget gradient alone (the seed's GradientWeightingMethodNone); retain is optional."
    )
    reference: ClassVar[str] = "vision_unlearning.utils.gradient_weighting"
    needs_gram: ClassVar[bool] = False
    min_groups: ClassVar[int] = 1


class Simple(MethodSpec):
    name: Literal["simple"] = "simple"
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    summary: ClassVar[str] = "Fixed weights: forget_weight * forget + retain_weight * retain."
    reference: ClassVar[str] = "vision_unlearning.utils.gradient_weighting"
    needs_gram: ClassVar[bool] = False

    _check = field_validator("forget_weight", "retain_weight")(_finite)


class Munba(MethodSpec):
    name: Literal["munba"] = "munba"
    summary: ClassVar[str] = (
        "The seed's MUNBa closed form (paper v1), kept exactly for reproducing published numbers; "
        "it meets only the first Nash equation (use `nash` for the exact solution)."
    )
    reference: ClassVar[str] = (
        "Wu & Harandi, MUNBa: Machine Unlearning via Nash Bargaining, arXiv:2411.15537v1"
    )


class Nash(MethodSpec):
    name: Literal["nash"] = "nash"
    max_norm: float | None = Field(default=None, gt=0)
    summary: ClassVar[str] = (
        "Exact Nash bargaining weights: the positive a with K a = 1/a (closed form for two groups, "
        "damped Newton beyond); optional max_norm rescales the result."
    )
    reference: ClassVar[str] = (
        "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022; Wu & Harandi, arXiv:2411.15537"
    )
    min_groups: ClassVar[int] = 2
    max_groups: ClassVar[int | None] = None
    group_names: ClassVar[tuple[str, ...] | None] = None


AnySpec: TypeAlias = Annotated[NoWeighting | Simple | Munba | Nash, Field(discriminator="name")]
SPEC_CLASSES: tuple[type[MethodSpec], ...] = (NoWeighting, Simple, Munba, Nash)
_ADAPTER: TypeAdapter[MethodSpec] = TypeAdapter(AnySpec)


def spec_class(name: str) -> type[MethodSpec]:
    for cls in SPEC_CLASSES:
        if cls.model_fields["name"].default == name:
            return cls
    raise InvalidMethod(f"unknown method {name!r}; known: {', '.join(method_names())}")


def method_names() -> list[str]:
    return [str(cls.model_fields["name"].default) for cls in SPEC_CLASSES]


def parse_method(value: MethodSpec | dict[str, Any] | str | bytes) -> MethodSpec:
    """A spec from a model, a dict, JSON text, or a bare method name; raises InvalidMethod."""
    if isinstance(value, MethodSpec):
        return value
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise InvalidMethod(f"method spec is not valid JSON: {exc.msg}") from None
        else:
            value = {"name": stripped}
    if not isinstance(value, dict):
        raise InvalidMethod("method spec must be a JSON object with a `name`")
    if "name" not in value:
        raise InvalidMethod("method spec lacks `name`")
    if value["name"] not in method_names():
        raise InvalidMethod(f"unknown method {value['name']!r}; known: {', '.join(method_names())}")
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidMethod(f"invalid options for {value['name']!r}: {problems}") from None


def filled(spec: MethodSpec) -> dict[str, Any]:
    """The spec with every default filled in, as the server echoes it."""
    return spec.model_dump(mode="json")
