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
    requires: ClassVar[str | None] = None
    """The server's optional extra the method needs (`pip install 'gradweight-server[<extra>]'`)."""
    guarantee: ClassVar[str] = ""
    """What the result promises, in one line (the README's methods table)."""

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
    guarantee: ClassVar[str] = "d = g_forget"


class Simple(MethodSpec):
    name: Literal["simple"] = "simple"
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    summary: ClassVar[str] = "Fixed weights: forget_weight * forget + retain_weight * retain."
    reference: ClassVar[str] = "vision_unlearning.utils.gradient_weighting"
    needs_gram: ClassVar[bool] = False
    guarantee: ClassVar[str] = "linear: d = w_f g_f + w_r g_r"

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
    guarantee: ClassVar[str] = "first Nash equation only: (K a)_r a_r = 1"


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
    guarantee: ClassVar[str] = "Nash bargaining: (K a)_i a_i = 1, a > 0, ‖d‖² = k (before max_norm)"


# --- multi-task weightings adapted from torchjd 0.18 (field defaults are torchjd's) ---------------------

PrefVector: TypeAlias = list[float] | dict[str, float] | None
SEED_MAX = 2**63 - 1


def _pref_vector(v: PrefVector) -> PrefVector:
    if v is None:
        return v
    values = list(v.values()) if isinstance(v, dict) else v
    if not values:
        raise ValueError("must not be empty")
    if not all(math.isfinite(x) for x in values):
        raise ValueError("must be finite")
    return v


class MultiTaskSpec(MethodSpec):
    """Base of the methods that take any number (>= 2) of freely named groups."""

    min_groups: ClassVar[int] = 2
    max_groups: ClassVar[int | None] = None
    group_names: ClassVar[tuple[str, ...] | None] = None
    torchjd: ClassVar[str] = ""
    """The torchjd 0.18 class the method adapts."""
    permutation_invariant: ClassVar[bool] = True
    """Reordering the groups reorders the weights and leaves the combined gradient unchanged."""


class UPGrad(MultiTaskSpec):
    name: Literal["upgrad"] = "upgrad"
    pref_vector: PrefVector = Field(
        default=None,
        description="weights of the projected gradients (list in group order, or by group name); "
        "default 1/k each",
    )
    norm_eps: float = Field(default=0.0001, ge=0, description="the gram is zeroed below this trace")
    reg_eps: float = Field(default=0.0001, ge=0, description="added to the normalised gram's diagonal")
    summary: ClassVar[str] = (
        "Unconflicting projection of gradients: each gradient projected onto the dual cone of all, then "
        "averaged (quadprog)."
    )
    reference: ClassVar[str] = (
        "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv:2406.16232"
    )
    torchjd: ClassVar[str] = "UPGradWeighting"
    guarantee: ClassVar[str] = "non-conflicting: K w >= 0"

    _check = field_validator("pref_vector")(_pref_vector)


class DualProj(MultiTaskSpec):
    name: Literal["dualproj"] = "dualproj"
    pref_vector: PrefVector = Field(
        default=None, description="weights of the vector to project (list or by group name); default 1/k"
    )
    norm_eps: float = Field(default=0.0001, ge=0, description="the gram is zeroed below this trace")
    reg_eps: float = Field(default=0.0001, ge=0, description="added to the normalised gram's diagonal")
    summary: ClassVar[str] = "The mean gradient projected onto the dual cone of the gradients (quadprog)."
    reference: ClassVar[str] = (
        "Lopez-Paz & Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017 (Eq. 11)"
    )
    torchjd: ClassVar[str] = "DualProjWeighting"
    guarantee: ClassVar[str] = "non-conflicting: K w >= 0"

    _check = field_validator("pref_vector")(_pref_vector)


class MGDA(MultiTaskSpec):
    name: Literal["mgda"] = "mgda"
    epsilon: float = Field(default=0.001, gt=0, description="Frank-Wolfe stops when its step is below this")
    max_iters: int = Field(default=100, gt=0, description="Frank-Wolfe iterations at most")
    summary: ClassVar[str] = "Minimum-norm point of the gradients' convex hull (Frank-Wolfe)."
    reference: ClassVar[str] = (
        "Désidéri 2012; Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"
    )
    torchjd: ClassVar[str] = "MGDAWeighting"
    guarantee: ClassVar[str] = "w on the simplex; K w >= ‖d‖² >= 0 at convergence"


class IMTLG(MultiTaskSpec):
    name: Literal["imtl_g"] = "imtl_g"
    summary: ClassVar[str] = (
        "Impartial MTL (gradient part): the combination with equal projections on every unit gradient."
    )
    reference: ClassVar[str] = (
        "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (generalised in arXiv:2406.16232)"
    )
    torchjd: ClassVar[str] = "IMTLGWeighting"
    guarantee: ClassVar[str] = "impartial: d·g_i/‖g_i‖ equal for all i, sum w = 1 (independent gradients)"


class AlignedMTL(MultiTaskSpec):
    name: Literal["aligned_mtl"] = "aligned_mtl"
    pref_vector: PrefVector = Field(
        default=None, description="weights of the aligned gradients (list or by group name); default 1/k"
    )
    scale_mode: Literal["min", "median", "rmse"] = Field(
        default="min", description="eigenvalue that scales the balance transformation"
    )
    summary: ClassVar[str] = (
        "Aligned-MTL: aligns the principal components of the gradients (balanced condition number)."
    )
    reference: ClassVar[str] = (
        "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023"
    )
    torchjd: ClassVar[str] = "AlignedMTLWeighting"
    guarantee: ClassVar[str] = "stable: the aligned gradients have condition number 1"

    _check = field_validator("pref_vector")(_pref_vector)


class PCGrad(MultiTaskSpec):
    name: Literal["pcgrad"] = "pcgrad"
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="seeds the random projection order (same request + same seed = same answer); "
        "null draws a fresh order",
    )
    summary: ClassVar[str] = (
        "Gradient surgery: each gradient loses its component along every gradient it conflicts with, "
        "in random order; the results are summed."
    )
    reference: ClassVar[str] = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"
    torchjd: ClassVar[str] = "PCGradWeighting"
    guarantee: ClassVar[str] = "conflicts projected out pairwise (non-conflicting for k = 2)"
    permutation_invariant: ClassVar[bool] = False


class CAGrad(MultiTaskSpec):
    name: Literal["cagrad"] = "cagrad"
    c: float = Field(ge=0, description="radius of the ball around the mean gradient, relative to its norm")
    norm_eps: float = Field(default=0.0001, ge=0, description="below this the result is the mean alone")
    summary: ClassVar[str] = (
        "Conflict-averse: the direction near the mean gradient that most improves the worst group (cvxpy)."
    )
    reference: ClassVar[str] = (
        "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    )
    requires: ClassVar[str | None] = "cvxpy"
    torchjd: ClassVar[str] = "CAGradWeighting"
    guarantee: ClassVar[str] = "max-min improvement within ‖d − g0‖ <= c‖g0‖ (g0 the mean)"


class Krum(MultiTaskSpec):
    name: Literal["krum"] = "krum"
    n_byzantine: int = Field(ge=0, description="groups that may be adversarial; needs k >= n_byzantine + 3")
    n_selected: int = Field(default=1, ge=1, description="groups averaged (Multi-Krum); at most k")
    summary: ClassVar[str] = (
        "(Multi-)Krum: the average of the n_selected gradients closest to their neighbours."
    )
    reference: ClassVar[str] = (
        "Blanchard et al., Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent, "
        "NeurIPS 2017"
    )
    min_groups: ClassVar[int] = 3
    torchjd: ClassVar[str] = "KrumWeighting"
    guarantee: ClassVar[str] = "Byzantine-robust: up to n_byzantine arbitrary gradients"


class FairGrad(MultiTaskSpec):
    name: Literal["fairgrad"] = "fairgrad"
    alpha: float = Field(description="fairness: 0 = mean, 1 = proportional fairness (Nash), large = max-min")
    max_iters: int | None = Field(
        default=None, gt=0, description="least-squares evaluations at most; null = scipy's 100 k"
    )
    summary: ClassVar[str] = "Alpha-fair resource allocation: K w = w^(-1/alpha), solved by scipy."
    reference: ClassVar[str] = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"
    torchjd: ClassVar[str] = "FairGradWeighting"
    guarantee: ClassVar[str] = "alpha-fair: (K w)_i = w_i^(-1/alpha), w >= 0"

    _check = field_validator("alpha")(_finite)


class GradVac(MultiTaskSpec):
    name: Literal["gradvac"] = "gradvac"
    beta: float = Field(default=0.5, ge=0, le=1, description="EMA decay of the cosine targets")
    eps: float = Field(default=1e-8, ge=0, description="added to denominators")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="seeds the random visiting order (step t uses seed + t); null draws a fresh order",
    )
    summary: ClassVar[str] = (
        "Gradient Vaccine: raises each pair's cosine towards its running (EMA) target; stateful."
    )
    reference: ClassVar[str] = (
        "Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively "
        "Multilingual Models, ICLR 2021"
    )
    stateful: ClassVar[bool] = True
    torchjd: ClassVar[str] = "GradVacWeighting"
    guarantee: ClassVar[str] = "cosines pulled up to their EMA targets"
    permutation_invariant: ClassVar[bool] = False


class Mean(MultiTaskSpec):
    name: Literal["mean"] = "mean"
    summary: ClassVar[str] = "The mean of the gradients."
    reference: ClassVar[str] = "linear scalarisation"
    needs_gram: ClassVar[bool] = False
    torchjd: ClassVar[str] = "MeanWeighting"
    guarantee: ClassVar[str] = "linear: w = 1/k"


class Sum(MultiTaskSpec):
    name: Literal["sum"] = "sum"
    summary: ClassVar[str] = "The sum of the gradients."
    reference: ClassVar[str] = "linear scalarisation"
    needs_gram: ClassVar[bool] = False
    torchjd: ClassVar[str] = "SumWeighting"
    guarantee: ClassVar[str] = "linear: w = 1"


class NashMTL(MultiTaskSpec):
    name: Literal["nash_mtl"] = "nash_mtl"
    max_norm: float = Field(default=1.0, ge=0, description="clip |d| to this; 0 disables the clipping")
    update_weights_every: int = Field(default=1, gt=0, description="re-solve every this many steps")
    optim_niter: int = Field(default=20, gt=0, description="sequential convex iterations at most")
    summary: ClassVar[str] = (
        "Nash-MTL as published (torchjd's NashMTL, cvxpy/ECOS, warm-started across steps); "
        "`nash` is the exact solution."
    )
    reference: ClassVar[str] = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
    stateful: ClassVar[bool] = True
    requires: ClassVar[str | None] = "cvxpy"
    torchjd: ClassVar[str] = "NashMTL"
    guarantee: ClassVar[str] = "approximate Nash bargaining (K a ≈ 1/a), ‖d‖ <= max_norm"


AnySpec: TypeAlias = Annotated[
    NoWeighting
    | Simple
    | Munba
    | Nash
    | UPGrad
    | DualProj
    | MGDA
    | IMTLG
    | AlignedMTL
    | PCGrad
    | CAGrad
    | Krum
    | FairGrad
    | GradVac
    | Mean
    | Sum
    | NashMTL,
    Field(discriminator="name"),
]
SPEC_CLASSES: tuple[type[MethodSpec], ...] = (
    NoWeighting,
    Simple,
    Munba,
    Nash,
    UPGrad,
    DualProj,
    MGDA,
    IMTLG,
    AlignedMTL,
    PCGrad,
    CAGrad,
    Krum,
    FairGrad,
    GradVac,
    Mean,
    Sum,
    NashMTL,
)
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
            except (ValueError, RecursionError):  # over-long integers, nesting past the recursion limit
                raise InvalidMethod("method spec JSON is too deep or has a number too long") from None
        else:
            value = {"name": stripped}
    if not isinstance(value, dict):
        raise InvalidMethod("method spec must be a JSON object with a `name`")
    if "name" not in value:
        raise InvalidMethod("method spec lacks `name`")
    if value["name"] not in method_names():
        shown = repr(value["name"])[:80]
        raise InvalidMethod(f"unknown method {shown}; known: {', '.join(method_names())}")
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
