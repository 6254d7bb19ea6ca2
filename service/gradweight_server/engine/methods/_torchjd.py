"""torchjd's Gramian weightings as methods: our float64 gram feeds their weighting, our combine applies it.

One generic adapter serves every stateless method (`BUILDERS` maps a method name to the torchjd weighting
built from its spec); the stateful ones (`gradvac`, `nash_mtl`) have their own modules and share the
helpers here: dependency checks, seeding, the state envelope and solver-error mapping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.util import find_spec
from typing import Any

import torch
from gradweight.errors import Degenerate, InvalidGradients, InvalidMethod
from gradweight.methods import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    FairGrad,
    Krum,
    Mean,
    MethodSpec,
    MultiTaskSpec,
    PCGrad,
    PrefVector,
    Sum,
    UPGrad,
)

# The modules each torchjd weighting needs (its `_REQUIRED_DEPS`, the quadprog projector's for UPGrad and
# DualProj); tests/engine/test_mtl_properties.py checks them against torchjd's own lists.
QUADPROG = ("numpy", "qpsolvers", "quadprog")
REQUIRED_MODULES: dict[str, tuple[str, ...]] = {
    "upgrad": QUADPROG,
    "dualproj": QUADPROG,
    "cagrad": ("numpy", "cvxpy", "clarabel"),
    "fairgrad": ("numpy", "scipy"),
    "nash_mtl": ("numpy", "cvxpy", "ecos"),
}

SEED_MODULUS = 2**63
_RNG_LOCK = threading.Lock()

Weighting = Callable[[torch.Tensor], torch.Tensor]


def missing_modules(spec_cls: type[MethodSpec]) -> list[str]:
    name = str(spec_cls.model_fields["name"].default)
    needed = REQUIRED_MODULES.get(name, ())
    if issubclass(spec_cls, MultiTaskSpec):
        needed = ("torchjd", *needed)
    return [m for m in needed if find_spec(m) is None]


def install_hint(spec_cls: type[MethodSpec]) -> str:
    if spec_cls.requires:
        return f"pip install 'gradweight-server[{spec_cls.requires}]'"
    return "reinstall gradweight-server (a required dependency is missing)"


def availability(spec_cls: type[MethodSpec]) -> tuple[bool, str | None]:
    """(True, None) when the method can run here, else (False, why and what to install)."""
    missing = missing_modules(spec_cls)
    if not missing:
        return True, None
    return False, f"needs {', '.join(missing)}: {install_hint(spec_cls)}"


def require(spec: MethodSpec) -> None:
    """InvalidMethod naming the extra to install when the method's optional dependency is missing."""
    ok, why = availability(type(spec))
    if not ok:
        raise InvalidMethod(f"method {spec.name!r} is not available on this server: {why}")


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run torchjd's `torch.randperm` calls from a CPU generator seeded with `seed`, then restore it.

    torchjd draws from the global CPU generator, so seeded calls are serialised by a lock; CUDA
    generators are not touched. `None` leaves the global generator alone (a fresh random draw).
    """
    if seed is None:
        yield
        return
    with _RNG_LOCK:
        saved = torch.default_generator.get_state()
        torch.default_generator.manual_seed(seed % SEED_MODULUS)
        try:
            yield
        finally:
            torch.default_generator.set_state(saved)


def solver_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a weighting raises when it has no answer for these gradients (mapped to Degenerate)."""
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


def call(spec: MethodSpec, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() as float64, its solver failures as Degenerate."""
    try:
        w = fn()
    except (InvalidMethod, InvalidGradients, Degenerate):
        raise
    except solver_errors() as exc:
        raise Degenerate(f"{spec.name}: {exc}") from None
    w = w.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(w).all()):
        raise Degenerate(f"{spec.name}: the weights are not finite for these gradients")
    return w


def pref_tensor(spec: MethodSpec, pref: PrefVector, names: Sequence[str]) -> torch.Tensor | None:
    """The preference vector in gram order (a list must have one entry per group; a dict name each)."""
    if pref is None:
        return None
    if isinstance(pref, dict):
        if set(pref) != set(names):
            raise InvalidMethod(
                f"{spec.name}: pref_vector names groups {sorted(pref)}, the request has {sorted(names)}"
            )
        values = [pref[n] for n in names]
    else:
        if len(pref) != len(names):
            raise InvalidMethod(f"{spec.name}: pref_vector has {len(pref)} entries for {len(names)} groups")
        values = list(pref)
    return torch.tensor(values, dtype=torch.float64)


def check_state(
    state: Any, method: str, names: Sequence[str], fields: Sequence[str]
) -> dict[str, Any] | None:
    """The incoming state envelope, or None to start fresh; InvalidMethod when it belongs elsewhere."""
    if state is None:
        return None
    if not isinstance(state, dict) or any(f not in state for f in ("method", "groups", "step", *fields)):
        raise InvalidMethod(f"{method}: `state` is not a state this server produced for {method!r}")
    if state["method"] != method:
        raise InvalidMethod(f"{method}: `state` was produced by method {state['method']!r}")
    if list(state["groups"]) != list(names):
        raise InvalidMethod(
            f"{method}: `state` was produced for groups {list(state['groups'])}, this request has "
            f"{list(names)}; send no state to start fresh"
        )
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidMethod(f"{method}: `state.step` must be a non-negative integer")
    return state


def finite_matrix(value: Any, k: int, what: str) -> torch.Tensor:
    try:
        m = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidMethod(f"`state.{what}` is not a matrix of numbers") from None
    if m.shape != (k, k) or not bool(torch.isfinite(m).all()):
        raise InvalidMethod(f"`state.{what}` must be a finite {k} x {k} matrix")
    return m


# --- the stateless methods ----------------------------------------------------------------------------


def _projector(spec: UPGrad | DualProj) -> Any:
    from torchjd._linalg import QuadprogProjector

    return QuadprogProjector(norm_eps=spec.norm_eps, reg_eps=spec.reg_eps)


def _upgrad(spec: UPGrad, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import UPGradWeighting

    return UPGradWeighting(pref_tensor(spec, spec.pref_vector, names), projector=_projector(spec))


def _dualproj(spec: DualProj, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import DualProjWeighting

    return DualProjWeighting(pref_tensor(spec, spec.pref_vector, names), projector=_projector(spec))


def _mgda(spec: MGDA, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import MGDAWeighting

    return MGDAWeighting(epsilon=spec.epsilon, max_iters=spec.max_iters)


def _imtl_g(spec: IMTLG, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import IMTLGWeighting

    return IMTLGWeighting()


def _aligned_mtl(spec: AlignedMTL, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import AlignedMTLWeighting

    return AlignedMTLWeighting(pref_tensor(spec, spec.pref_vector, names), scale_mode=spec.scale_mode)


def _pcgrad(spec: PCGrad, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import PCGradWeighting

    return PCGradWeighting()


def _cagrad(spec: CAGrad, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import CAGradWeighting

    return CAGradWeighting(c=spec.c, norm_eps=spec.norm_eps)


def _krum(spec: Krum, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import KrumWeighting

    k = len(names)
    if k < spec.n_byzantine + 3:
        raise InvalidGradients(
            f"krum with n_byzantine={spec.n_byzantine} needs at least {spec.n_byzantine + 3} groups, got {k}"
        )
    if spec.n_selected > k:
        raise InvalidGradients(f"krum: n_selected={spec.n_selected} exceeds the {k} groups")
    return KrumWeighting(n_byzantine=spec.n_byzantine, n_selected=spec.n_selected)


def _fairgrad(spec: FairGrad, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import FairGradWeighting

    return FairGradWeighting(alpha=spec.alpha, max_iters=spec.max_iters)


def _mean(spec: Mean, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import MeanWeighting

    return MeanWeighting()


def _sum(spec: Sum, names: Sequence[str]) -> Weighting:
    from torchjd.aggregation import SumWeighting

    return SumWeighting()


BUILDERS: dict[str, Callable[[Any, Sequence[str]], Weighting]] = {
    "upgrad": _upgrad,
    "dualproj": _dualproj,
    "mgda": _mgda,
    "imtl_g": _imtl_g,
    "aligned_mtl": _aligned_mtl,
    "pcgrad": _pcgrad,
    "cagrad": _cagrad,
    "krum": _krum,
    "fairgrad": _fairgrad,
    "mean": _mean,
    "sum": _sum,
}


def weights(
    spec: MethodSpec, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    """Weights of a stateless torchjd weighting; `mean` and `sum` need only the group count."""
    require(spec)
    weighting = BUILDERS[spec.name](spec, names)
    # MeanWeighting / SumWeighting read only the row count of what they are given
    stat = gram if gram is not None else torch.empty(len(names), 0, dtype=torch.float64)
    seed = getattr(spec, "seed", None)

    def compute() -> torch.Tensor:
        with seeded(seed):
            return weighting(stat)

    w = call(spec, compute)
    if w.shape != (len(names),):
        raise Degenerate(f"{spec.name}: no weights for these gradients")
    return w, None
