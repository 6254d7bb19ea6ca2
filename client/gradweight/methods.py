"""Method specs: the typed `method` object of PROTOCOL.md, shared by client and server.

A spec is a frozen pydantic model discriminated on `name`; unknown names and unknown options are errors.
Each class also says what the protocol needs to know about it: whether a reply carries the gram
(`needs_gram`) and the weights (`gives_weights`), which groups it takes and whether it is stateful, so
`GET /v1/methods` and the client's validation read one source. What only the server needs (optional
modules, the torchjd class adapted) lives in the server's method files.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

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
    gives_weights: ClassVar[bool] = True
    """False for the elementwise methods: their reply is the combined gradient alone, without `weights`."""
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
    min_groups: ClassVar[int] = 1
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
    """Base of the methods that take any number (>= 1) of freely named groups."""

    min_groups: ClassVar[int] = 1
    max_groups: ClassVar[int | None] = None
    group_names: ClassVar[tuple[str, ...] | None] = None


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
    guarantee: ClassVar[str] = "w on the simplex; K w >= ‖d‖² >= 0 at convergence"


class IMTLG(MultiTaskSpec):
    name: Literal["imtl_g"] = "imtl_g"
    summary: ClassVar[str] = (
        "Impartial MTL (gradient part): the combination with equal projections on every unit gradient."
    )
    reference: ClassVar[str] = (
        "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (generalised in arXiv:2406.16232)"
    )
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
    guarantee: ClassVar[str] = "conflicts projected out pairwise (non-conflicting for k = 2)"


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
    guarantee: ClassVar[str] = "Byzantine-robust: up to n_byzantine arbitrary gradients"


class FairGrad(MultiTaskSpec):
    name: Literal["fairgrad"] = "fairgrad"
    alpha: float = Field(description="fairness: 0 = mean, 1 = proportional fairness (Nash), large = max-min")
    max_iters: int | None = Field(
        default=None, gt=0, description="least-squares evaluations at most; null = scipy's 100 k"
    )
    summary: ClassVar[str] = "Alpha-fair resource allocation: K w = w^(-1/alpha), solved by scipy."
    reference: ClassVar[str] = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"
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
    guarantee: ClassVar[str] = "cosines pulled up to their EMA targets"


class Mean(MultiTaskSpec):
    name: Literal["mean"] = "mean"
    summary: ClassVar[str] = "The mean of the gradients."
    reference: ClassVar[str] = "linear scalarisation"
    needs_gram: ClassVar[bool] = False
    guarantee: ClassVar[str] = "linear: w = 1/k"


class Sum(MultiTaskSpec):
    name: Literal["sum"] = "sum"
    summary: ClassVar[str] = "The sum of the gradients."
    reference: ClassVar[str] = "linear scalarisation"
    needs_gram: ClassVar[bool] = False
    guarantee: ClassVar[str] = "linear: w = 1"


class NashMTL(MultiTaskSpec):
    """torchjd's NashMTL fails on one group (cvxpy refuses its scalar problem): two at least."""

    name: Literal["nash_mtl"] = "nash_mtl"
    max_norm: float = Field(default=1.0, ge=0, description="clip |d| to this; 0 disables the clipping")
    update_weights_every: int = Field(default=1, gt=0, description="re-solve every this many steps")
    optim_niter: int = Field(default=20, gt=0, description="sequential convex iterations at most")
    summary: ClassVar[str] = (
        "Nash-MTL as published (torchjd's NashMTL, cvxpy/ECOS, warm-started across steps); "
        "`nash` is the exact solution."
    )
    reference: ClassVar[str] = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
    min_groups: ClassVar[int] = 2
    stateful: ClassVar[bool] = True
    guarantee: ClassVar[str] = "approximate Nash bargaining (K a ≈ 1/a), ‖d‖ <= max_norm"


def _seed(what: str) -> Any:
    return Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description=f"seeds {what} (same request + same seed = same answer); null draws afresh",
    )


class ConFIG(MultiTaskSpec):
    name: Literal["config"] = "config"
    pref_vector: PrefVector = Field(
        default=None,
        description="the target's weights over the unit gradients (list or by group name); default 1 each",
    )
    summary: ClassVar[str] = (
        "Conflict-free update: the direction with the preferred (equal) cosines to every gradient, "
        "scaled by the sum of the gradients' projections on it."
    )
    reference: ClassVar[str] = (
        "Liu et al., ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks, "
        "ICLR 2025 (arXiv:2408.11104)"
    )
    guarantee: ClassVar[str] = "non-conflicting: d·g_i >= 0, equal cosines for linearly independent g_i"

    _check = field_validator("pref_vector")(_pref_vector)


class Random(MultiTaskSpec):
    name: Literal["random"] = "random"
    seed: int | None = _seed("the weights' draw")
    summary: ClassVar[str] = "Random loss weighting: softmax of k standard normal draws."
    reference: ClassVar[str] = (
        "Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task "
        "Learning, TMLR 2022 (arXiv:2111.10603)"
    )
    needs_gram: ClassVar[bool] = False
    guarantee: ClassVar[str] = "w on the simplex, w = softmax(z), z ~ N(0, I) from the seed"


class Constant(MultiTaskSpec):
    name: Literal["constant"] = "constant"
    weights: dict[str, float] = Field(min_length=1, description="one fixed weight per group, by group name")
    summary: ClassVar[str] = "Fixed weights for any number of groups, keyed by group name."
    reference: ClassVar[str] = "linear scalarisation"
    needs_gram: ClassVar[bool] = False
    guarantee: ClassVar[str] = "linear: d = sum_i w_i g_i"

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for x in v.values():
            _finite(x)
        return v


class TrimmedMean(MultiTaskSpec):
    name: Literal["trimmed_mean"] = "trimmed_mean"
    trim_number: int = Field(ge=0, description="values dropped at each end of every coordinate; k >= 2t + 1")
    summary: ClassVar[str] = (
        "Coordinate-wise trimmed mean: per coordinate, the mean after dropping the trim_number largest "
        "and smallest values (elementwise; no weights)."
    )
    reference: ClassVar[str] = (
        "Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates, ICML 2018"
    )
    needs_gram: ClassVar[bool] = False
    gives_weights: ClassVar[bool] = False
    guarantee: ClassVar[str] = "robust: each coordinate ignores the trim_number extremes on either side"


class GradDrop(MultiTaskSpec):
    name: Literal["graddrop"] = "graddrop"
    leak: PrefVector = Field(
        default=None,
        description="per group, the fraction of its gradient kept unmasked (list or by group name); "
        "default 0",
    )
    seed: int | None = _seed("the per-coordinate uniform draws")
    summary: ClassVar[str] = (
        "Gradient sign dropout: per coordinate, keeps the gradients of one sign, chosen at random with "
        "the positive sign's purity as probability (elementwise; no weights)."
    )
    reference: ClassVar[str] = (
        "Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout, "
        "NeurIPS 2020"
    )
    needs_gram: ClassVar[bool] = False
    gives_weights: ClassVar[bool] = False
    guarantee: ClassVar[str] = "per coordinate, the kept gradients agree in sign (with no leak)"

    _check = field_validator("leak")(_pref_vector)


class MoDo(MultiTaskSpec):
    name: Literal["modo"] = "modo"
    gamma: float = Field(default=0.1, gt=0, description="learning rate of the task-weight update")
    rho: float = Field(default=0.1, ge=0, description="l2 regularisation of the task weights")
    summary: ClassVar[str] = (
        "MoDo: one projected gradient step of the task weights on the simplex per call; stateful."
    )
    reference: ClassVar[str] = (
        "Chen et al., Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and "
        "Conflict-Avoidance, JMLR 2024"
    )
    stateful: ClassVar[bool] = True
    guarantee: ClassVar[str] = "w on the simplex, one step of min_w ½ wᵀ(K + rho I)w"

    _check = field_validator("gamma", "rho")(_finite)


class PCD(MultiTaskSpec):
    name: Literal["pcd"] = "pcd"
    tau: float | list[float] = Field(
        default=0.02,
        description="fraction in [0, 1] of normalised progress guaranteed to each secondary group: one "
        "number, or one per secondary group (k - 1)",
    )
    beta: float = Field(default=0.999, ge=0, lt=1, description="EMA decay of the squared gradient norms")
    eps: float = Field(default=1e-8, ge=0, description="added to the EMA before its inverse square root")
    summary: ClassVar[str] = (
        "Priority-constrained descent: closest to the first group's gradient while every other group "
        "keeps a fraction tau of its own progress; stateful (EMA of squared norms)."
    )
    reference: ClassVar[str] = (
        "Varam et al., Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical "
        "Multi-Objective Optimization, TMLR 2026"
    )
    stateful: ClassVar[bool] = True
    guarantee: ClassVar[str] = "g̃_j·d >= tau ‖g̃_j‖² for every secondary j (when feasible), ‖d‖ = ‖g_1‖"

    @field_validator("tau")
    @classmethod
    def _fractions(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or not all(0.0 <= x <= 1.0 for x in values):
            raise ValueError("must be in [0, 1]")
        return v


class SDMGrad(MultiTaskSpec):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: Literal["sdmgrad"] = "sdmgrad"
    lr: float = Field(default=10.0, gt=0, description="learning rate of the inner SGD on the task weights")
    momentum: float = Field(default=0.5, ge=0, lt=1, description="momentum of the inner SGD")
    n_iter: int = Field(default=20, gt=0, description="inner SGD iterations per call")
    lambda_: float = Field(
        default=0.3, ge=0, alias="lambda", description="pull of the direction towards the preference"
    )
    pref_vector: PrefVector = Field(
        default=None, description="the preferred direction's weights (list or by group name); default 1/k"
    )
    summary: ClassVar[str] = (
        "Stochastic direction-oriented MGDA: inner SGD on the simplex, pulled towards a preferred "
        "direction; stateful (the task weights)."
    )
    reference: ClassVar[str] = (
        "Xiao et al., Direction-oriented Multi-objective Learning: Simple and Provable Stochastic "
        "Algorithms, NeurIPS 2023"
    )
    stateful: ClassVar[bool] = True
    guarantee: ClassVar[str] = "w = (λ_simplex + lambda w̃) / (1 + lambda)"

    _check = field_validator("pref_vector")(_pref_vector)
    _check_floats = field_validator("lr", "lambda_")(_finite)


class ExcessMTL(MultiTaskSpec):
    name: Literal["excess_mtl"] = "excess_mtl"
    robust_step_size: float = Field(default=1.0, gt=0, description="step of the exponentiated update")
    n_warmup_steps: int = Field(default=0, ge=0, description="steps of uniform weights first")
    summary: ClassVar[str] = (
        "ExcessMTL: weights raised by each task's estimated excess risk. Not served: its state is k x n."
    )
    reference: ClassVar[str] = "He et al., Robust Multi-Task Learning with Excess Risks, ICML 2024"
    stateful: ClassVar[bool] = True
    guarantee: ClassVar[str] = "w on the simplex (exponentiated gradient on excess risks)"


class CRMOGM(MultiTaskSpec):
    name: Literal["crmogm"] = "crmogm"
    weighting: AnySpec = Field(
        description="the weighting smoothed: any method spec that gives weights for free group names"
    )
    alpha: float = Field(default=0.9, ge=0, le=1, description="EMA weight of the previous weights")
    initial_weights: PrefVector = Field(
        default=None,
        description="the weights before the first step (list or by group name); default the first step's own",
    )
    summary: ClassVar[str] = (
        "CR-MOGM: an exponential moving average of another weighting's weights; stateful."
    )
    reference: ClassVar[str] = (
        "Zhou et al., On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond, "
        "NeurIPS 2022"
    )
    stateful: ClassVar[bool] = True
    guarantee: ClassVar[str] = "w_t = alpha w_(t-1) + (1 - alpha) ŵ_t (ŵ the wrapped weighting's)"

    _check = field_validator("initial_weights")(_pref_vector)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The schema as an object, like every other method's (pydantic writes a recursive model as a
        bare `$ref` into its `$defs`)."""
        schema = super().model_json_schema(*args, **kwargs)
        ref = schema.pop("$ref", None)
        if ref is None:
            return schema
        return {**schema["$defs"][ref.rsplit("/", 1)[-1]], "$defs": schema["$defs"]}

    @field_validator("weighting")
    @classmethod
    def _wraps_weights(cls, v: MethodSpec) -> MethodSpec:
        if not isinstance(v, MultiTaskSpec) or not v.gives_weights or isinstance(v, (CRMOGM, ExcessMTL)):
            raise ValueError(f"{v.name!r} cannot be wrapped: it must give weights for free group names")
        return v


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
    | NashMTL
    | ConFIG
    | Random
    | Constant
    | TrimmedMean
    | GradDrop
    | MoDo
    | PCD
    | SDMGrad
    | CRMOGM
    | ExcessMTL,
    Field(discriminator="name"),
]
SPEC_CLASSES: tuple[type[MethodSpec], ...] = get_args(get_args(AnySpec)[0])
"""Every method's spec class, in the order of AnySpec (the order of GET /v1/methods)."""
CRMOGM.model_rebuild()
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
