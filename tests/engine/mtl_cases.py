"""Inputs and torchjd oracles for the multi-task method tests.

The oracles are built here from the spec's fields, independently of the server's adapters, so a wiring
mistake in an adapter (a dropped option, groups in the wrong order) shows up as a mismatch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from gradweight.methods import MethodSpec, MultiTaskSpec, parse_method

SHAPES: list[tuple[int, ...]] = [(7, 5), (13,), (3, 2, 4), (), (60, 4)]
N_PARAMS = sum(math.prod(s) for s in SHAPES)


def names_for(k: int) -> list[str]:
    return [f"task{i}" for i in range(k)]


def matrix(k: int, seed: int, dtype: torch.dtype = torch.float32, n: int = N_PARAMS) -> torch.Tensor:
    """k rows J = U diag(s) V^T (U random orthogonal, s in [0.3, 1]), rows rescaled within 10x of each
    other: cosines spread over (-1, 1), negative ones included, and a gram conditioned well enough that
    float32 rounding moves no method's answer by more than ~1e-6."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = 0.3 + 0.7 * torch.rand(k, generator=gen, dtype=torch.float64)
    scales = torch.logspace(-0.5, 0.5, k, dtype=torch.float64)[torch.randperm(k, generator=gen)]
    j = (u * s) @ v.T * scales.reshape(k, 1)
    return j.to(dtype)


def case_seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def split(row: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in SHAPES:
        n = math.prod(s)
        out.append(row[offset : offset + n].reshape(s).clone())
        offset += n
    assert offset == row.numel()
    return out


def groups_of(j: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    return {name: split(j[i]) for i, name in enumerate(names_for(j.shape[0]))}


def options(name: str, k: int) -> dict[str, Any]:
    """Non-default options where a method has them, so the adapters' wiring is exercised."""
    names = names_for(k)
    prefs = {n: 1.0 + 0.5 * i for i, n in enumerate(names)}
    return {
        "upgrad": {"pref_vector": prefs, "reg_eps": 1e-5},
        "dualproj": {"pref_vector": [prefs[n] for n in names], "norm_eps": 1e-5},
        "mgda": {"epsilon": 1e-4, "max_iters": 200},
        "aligned_mtl": {"scale_mode": "median"},
        "pcgrad": {"seed": 1234 + k},
        "cagrad": {"c": 0.4},
        "krum": {"n_byzantine": 1, "n_selected": 2} if k >= 4 else {"n_byzantine": 0},
        "fairgrad": {"alpha": 2.0},
        "gradvac": {"beta": 0.3, "seed": 99},
        "nash_mtl": {"max_norm": 1.5},
        "config": {"pref_vector": prefs},
        "random": {"seed": 77 + k},
        "constant": {"weights": prefs},
        "trimmed_mean": {"trim_number": min(2, (k - 1) // 2)},
        "graddrop": {"leak": {n: 0.1 * i for i, n in enumerate(names)}, "seed": 5 + k},
        "modo": {"gamma": 0.2, "rho": 0.05},
        "pcd": {"tau": 0.1, "eps": 0.0},
        "sdmgrad": {"lambda": 0.5, "n_iter": 10},
        "crmogm": {"weighting": {"name": "upgrad"}, "alpha": 0.7},
    }.get(name, {})


def spec_for(name: str, k: int) -> MethodSpec:
    return parse_method({"name": name, **options(name, k)})


def _pref(spec: Any, k: int, field: str = "pref_vector") -> torch.Tensor | None:
    pref = getattr(spec, field)
    if pref is None:
        return None
    values = [pref[n] for n in names_for(k)] if isinstance(pref, dict) else pref
    return torch.tensor(values)


def torchjd_weighting(spec: Any, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchjd's Gramian weighting for `spec` (called on a k x k Gramian)."""
    from torchjd import aggregation as A
    from torchjd._linalg import QuadprogProjector

    name = spec.name
    if name in ("upgrad", "dualproj"):
        projector = QuadprogProjector(norm_eps=spec.norm_eps, reg_eps=spec.reg_eps)
        cls = A.UPGradWeighting if name == "upgrad" else A.DualProjWeighting
        return cls(_pref(spec, k), projector=projector)
    makers: dict[str, Callable[[], Any]] = {
        "mgda": lambda: A.MGDAWeighting(epsilon=spec.epsilon, max_iters=spec.max_iters),
        "imtl_g": A.IMTLGWeighting,
        "aligned_mtl": lambda: A.AlignedMTLWeighting(_pref(spec, k), scale_mode=spec.scale_mode),
        "pcgrad": A.PCGradWeighting,
        "cagrad": lambda: A.CAGradWeighting(c=spec.c, norm_eps=spec.norm_eps),
        "krum": lambda: A.KrumWeighting(n_byzantine=spec.n_byzantine, n_selected=spec.n_selected),
        "fairgrad": lambda: A.FairGradWeighting(alpha=spec.alpha, max_iters=spec.max_iters),
        "gradvac": lambda: A.GradVacWeighting(beta=spec.beta, eps=spec.eps),
        "mean": A.MeanWeighting,
        "sum": A.SumWeighting,
        "random": A.RandomWeighting,
        "constant": lambda: A.ConstantWeighting(_pref(spec, k, "weights")),
        "modo": lambda: A.MoDoWeighting(gamma=spec.gamma, rho=spec.rho),
        "pcd": lambda: A.PCDWeighting(tau=spec.tau, beta=spec.beta, eps=spec.eps),
        "sdmgrad": lambda: A.SDMGradWeighting(
            lr=spec.lr,
            momentum=spec.momentum,
            n_iter=spec.n_iter,
            lambda_=spec.lambda_,
            pref_vector=_pref(spec, k),
        ),
        "crmogm": lambda: A.CRMOGMWeighting(
            torchjd_weighting(spec.weighting, k),
            alpha=spec.alpha,
            initial_weights=_pref(spec, k, "initial_weights"),
        ),
    }
    return makers[name]()


def torchjd_aggregator(spec: Any, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchjd's aggregator for `spec` (called on the stacked k x n matrix)."""
    from torchjd import aggregation as A
    from torchjd._linalg import QuadprogProjector

    name = spec.name
    if name in ("upgrad", "dualproj"):
        projector = QuadprogProjector(norm_eps=spec.norm_eps, reg_eps=spec.reg_eps)
        cls = A.UPGrad if name == "upgrad" else A.DualProj
        return cls(_pref(spec, k), projector=projector)
    makers: dict[str, Callable[[], Any]] = {
        "mgda": lambda: A.MGDA(epsilon=spec.epsilon, max_iters=spec.max_iters),
        "imtl_g": A.IMTLG,
        "aligned_mtl": lambda: A.AlignedMTL(_pref(spec, k), scale_mode=spec.scale_mode),
        "pcgrad": A.PCGrad,
        "cagrad": lambda: A.CAGrad(c=spec.c, norm_eps=spec.norm_eps),
        "krum": lambda: A.Krum(n_byzantine=spec.n_byzantine, n_selected=spec.n_selected),
        "fairgrad": lambda: A.FairGrad(alpha=spec.alpha, max_iters=spec.max_iters),
        "gradvac": lambda: A.GradVac(beta=spec.beta, eps=spec.eps),
        "mean": A.Mean,
        "sum": A.Sum,
        "nash_mtl": lambda: A.NashMTL(
            n_tasks=k,
            max_norm=spec.max_norm,
            update_weights_every=spec.update_weights_every,
            optim_niter=spec.optim_niter,
        ),
        "config": lambda: A.ConFIG(_pref(spec, k)),
        "random": A.Random,
        "constant": lambda: A.Constant(_pref(spec, k, "weights")),
        "trimmed_mean": lambda: A.TrimmedMean(spec.trim_number),
        "graddrop": lambda: A.GradDrop(leak=_pref(spec, k, "leak")),
    }
    return makers[name]()


def mtl_names() -> list[str]:
    """Every multi-task method this server serves (excess_mtl is listed but not served)."""
    from gradweight.methods import SPEC_CLASSES

    return [
        str(c.model_fields["name"].default)
        for c in SPEC_CLASSES
        if issubclass(c, MultiTaskSpec) and c.model_fields["name"].default != "excess_mtl"
    ]


STATELESS = ["upgrad", "dualproj", "mgda", "imtl_g", "aligned_mtl", "pcgrad", "cagrad", "krum", "fairgrad",
             "mean", "sum", "config", "random", "constant"]  # fmt: skip
ELEMENTWISE = ["trimmed_mean", "graddrop"]
STATEFUL = ["gradvac", "nash_mtl", "modo", "pcd", "sdmgrad", "crmogm"]
