"""Properties of the multi-task methods in the layout of torchjd's tests/unit/aggregation/_asserts.py:
finite outputs, permutation invariance, non-conflict, scaling, seeded randomness, availability."""

from __future__ import annotations

import math

import pytest
import torch
from gradweight.errors import Degenerate, InvalidGradients, InvalidMethod
from gradweight.methods import SPEC_CLASSES, MultiTaskSpec, parse_method, spec_class
from gradweight_server.engine import run
from gradweight_server.engine.methods import REGISTRY, _registry, availability

from .mtl_cases import case_seed, groups_of, matrix, mtl_names, spec_for

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # cvxpy on a zero row, before it gives up
]

MTL = mtl_names()


def weights_of(out) -> torch.Tensor:
    if out.weights is None:  # elementwise: no weights, nothing to check beyond the result
        return torch.zeros(0, dtype=torch.float64)
    return torch.tensor(list(out.weights.values()), dtype=torch.float64)


def inputs(k: int, kind: str, seed: int) -> torch.Tensor:
    j = matrix(k, seed=seed, dtype=torch.float64)
    if kind == "rank1":
        signs = torch.tensor([(-1.0) ** i * (1 + i) for i in range(k)], dtype=torch.float64)
        return signs.reshape(k, 1) * j[0]
    if kind == "zero-row":
        j[1] = 0.0
        return j
    return j * {"tiny": 1e-6, "huge": 1e6}.get(kind, 1.0)


@pytest.mark.parametrize("kind", ["random", "tiny", "huge", "rank1", "zero-row"])
@pytest.mark.parametrize("name", MTL)
def test_outputs_are_finite_or_degenerate(name: str, kind: str) -> None:
    for k in (3, 6):
        spec = spec_for(name, k)
        j = inputs(k, kind, case_seed(name, kind, k)).float()
        try:
            out = run(spec, groups_of(j))
        except Degenerate:
            assert kind in ("rank1", "zero-row"), f"{name} refused well-posed {kind} inputs"
            continue
        assert bool(torch.isfinite(out.flat).all())
        assert bool(torch.isfinite(weights_of(out)).all())


PERMUTATION_INVARIANT = [n for n in MTL if REGISTRY[n].permutation_invariant]


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_permutation_invariance(name: str) -> None:
    k = 5
    spec = spec_for(name, k)
    groups = groups_of(matrix(k, seed=case_seed("perm", name), dtype=torch.float64))
    order = [3, 0, 4, 1, 2]
    names = list(groups)
    permuted = {names[i]: groups[names[i]] for i in order}
    spec_permuted = spec
    if isinstance(getattr(spec, "pref_vector", None), list):
        spec_permuted = spec.model_copy(update={"pref_vector": [spec.pref_vector[i] for i in order]})
    a, b = run(spec, groups), run(spec_permuted, permuted)
    for n in names if a.weights is not None and b.weights is not None else []:
        assert b.weights[n] == pytest.approx(a.weights[n], rel=1e-5, abs=1e-9)
    torch.testing.assert_close(b.flat, a.flat, rtol=1e-5, atol=1e-7 * float(a.flat.abs().max()))


def conflicting(k: int, seed: int) -> torch.Tensor:
    """Inputs where the mean conflicts with at least one gradient."""
    for s in range(seed, seed + 100):
        j = matrix(k, seed=s, dtype=torch.float64)
        if bool(((j @ j.T).sum(1) < 0).any()):
            return j
    raise AssertionError("no conflicting input found")


@pytest.mark.parametrize(
    ("name", "ks"),
    [("upgrad", (2, 5, 10)), ("dualproj", (2, 5, 10)), ("pcgrad", (2,)), ("nash", (2, 5, 10)),
     ("mgda", (2, 5, 10)), ("config", (2, 5, 10))],
)  # fmt: skip
def test_non_conflicting(name: str, ks: tuple[int, ...]) -> None:
    for k in ks:
        spec = parse_method({"name": name, "epsilon": 1e-9, "max_iters": 10_000} if name == "mgda" else name)
        j = conflicting(k, case_seed("conflict", name, k))
        out = run(spec, groups_of(j))
        kw = (j @ j.T) @ weights_of(out)
        # UPGrad / DualProj solve on the trace-normalised gram plus reg_eps I: K w >= -reg_eps tr(K) w
        tol = 1.01e-4 * float(torch.trace(j @ j.T)) * float(weights_of(out).abs().max())
        if name == "mgda":  # Frank-Wolfe to 1e-9 reaches the min-norm point: K w >= |d|^2 > 0
            tol = 1e-6 * float(kw.abs().max())
        assert float(kw.min()) >= -tol, f"{name} k={k}: K w = {kw.tolist()}"
        assert torch.allclose(j.T @ weights_of(out), out.flat, rtol=1e-9, atol=1e-12)


def fairgrad_degree(alpha: float) -> float:
    return (1 - alpha) / (1 + alpha)  # K w = w^(-1/alpha) with K -> c^2 K gives w -> c^(-2 alpha/(1+alpha)) w


DEGREE = {n: 1.0 for n in MTL if n not in ("gradvac", "nash_mtl", "fairgrad", "modo", "sdmgrad")}
DEGREE |= {"nash": 0.0, "fairgrad": fairgrad_degree(2.0)}


@pytest.mark.parametrize("name", sorted(DEGREE))
def test_scaling(name: str) -> None:
    """Scaling every gradient by c scales the result by c^degree (1: positively homogeneous,
    0: scale-free like Nash)."""
    k = 4
    spec = spec_for(name, k) if name != "nash" else parse_method("nash")
    j = matrix(k, seed=case_seed("scale", name), dtype=torch.float64)
    base = run(spec, groups_of(j)).flat
    for c in (0.05, 37.0, 1e3):
        got = run(spec, groups_of(j * c)).flat
        want = base * c ** DEGREE[name]
        rtol = 2e-4 if name == "fairgrad" else 1e-5  # scipy's least_squares stops at ftol 1e-8
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "random", "graddrop"])
def test_seeded_randomness_is_reproducible_and_private(name: str) -> None:
    k = 6
    groups = groups_of(conflicting(k, case_seed("seed", name)).float())
    before = torch.get_rng_state()
    spec = parse_method({"name": name, "seed": 11})
    a, b = run(spec, groups), run(spec, groups)
    assert a.weights == b.weights
    assert torch.equal(a.flat, b.flat)
    assert torch.equal(torch.get_rng_state(), before), "a seeded call must not move the global generator"
    others = {run(parse_method({"name": name, "seed": s}), groups).flat.numpy().tobytes() for s in range(6)}
    assert len(others) > 1, "the seed should change the draws"
    run(parse_method(name), groups)  # seed null: torchjd's behaviour, the global generator


def test_registry_and_metadata_cover_every_spec() -> None:
    from torchjd import aggregation

    assert list(REGISTRY) == [str(c.model_fields["name"].default) for c in SPEC_CLASSES]
    for cls in SPEC_CLASSES:
        name = str(cls.model_fields["name"].default)
        method = REGISTRY[name]
        assert method.spec is cls
        assert cls.summary, name
        assert cls.reference, name
        assert cls.guarantee, name
        if issubclass(cls, MultiTaskSpec):
            assert cls.group_names is None
            assert cls.max_groups is None
            assert method.torchjd is not None
            assert hasattr(aggregation, method.torchjd), method.torchjd
            assert cls.stateful == (
                name in ("gradvac", "nash_mtl", "modo", "pcd", "sdmgrad", "crmogm", "excess_mtl")
            )
        assert cls.gives_weights == (method.aggregate is None)
        if name == "excess_mtl":
            ok, why = availability(cls)
            assert not ok
            assert why is not None
            assert "k x n" in why
        else:
            assert availability(cls) == (True, None)


def test_required_modules_match_torchjd() -> None:
    from torchjd._linalg import QuadprogProjector
    from torchjd.aggregation import CAGradWeighting, FairGradWeighting
    from torchjd.aggregation._nash_mtl import _NashMTLWeighting

    theirs = {
        "upgrad": QuadprogProjector._REQUIRED_DEPS,
        "dualproj": QuadprogProjector._REQUIRED_DEPS,
        "cagrad": CAGradWeighting._REQUIRED_DEPS,
        "fairgrad": FairGradWeighting._REQUIRED_DEPS,
        "nash_mtl": _NashMTLWeighting._REQUIRED_DEPS,
    }
    ours = {n: [m for m in REGISTRY[n].requires if m != "torchjd"] for n in REGISTRY}
    assert {n: m for n, m in ours.items() if m} == theirs


def test_missing_extra_is_unavailable_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _registry.find_spec
    monkeypatch.setattr(_registry, "find_spec", lambda m: None if m == "cvxpy" else real(m))
    for name in ("cagrad", "nash_mtl"):
        ok, why = availability(spec_class(name))
        assert not ok
        assert why is not None
        assert "cvxpy" in why
        assert "pip install 'gradweight-server[cvxpy]'" in why
        spec = spec_for(name, 3)
        with pytest.raises(InvalidMethod, match=r"gradweight-server\[cvxpy\]"):
            run(spec, groups_of(matrix(3, seed=1)))
    assert availability(spec_class("upgrad")) == (True, None)
    assert availability(spec_class("nash")) == (True, None)


def test_option_and_group_mismatches_are_clear() -> None:
    groups = groups_of(matrix(3, seed=3))
    with pytest.raises(InvalidMethod, match="pref_vector has 2 entries for 3 groups"):
        run(parse_method({"name": "upgrad", "pref_vector": [1, 2]}), groups)
    with pytest.raises(InvalidMethod, match="pref_vector names groups"):
        run(parse_method({"name": "aligned_mtl", "pref_vector": {"task0": 1, "x": 2, "task2": 1}}), groups)
    with pytest.raises(InvalidGradients, match="needs at least 5 groups"):
        run(parse_method({"name": "krum", "n_byzantine": 2}), groups_of(matrix(4, seed=3)))
    with pytest.raises(InvalidGradients, match="n_selected=4 exceeds"):
        run(parse_method({"name": "krum", "n_byzantine": 0, "n_selected": 4}), groups)
    with pytest.raises(InvalidGradients, match="takes 2 to any groups"):
        run(parse_method("nash_mtl"), {"only": groups["task0"]})
    with pytest.raises(InvalidGradients, match="needs at least 5 groups"):
        run(parse_method({"name": "trimmed_mean", "trim_number": 2}), groups_of(matrix(4, seed=3)))
    with pytest.raises(InvalidMethod, match="weights names groups"):
        run(parse_method({"name": "constant", "weights": {"task0": 1, "task1": 2}}), groups)
    with pytest.raises(InvalidMethod, match="leak has 2 entries for 3 groups"):
        run(parse_method({"name": "graddrop", "leak": [0.1, 0.2]}), groups)
    with pytest.raises(InvalidMethod, match="tau has 1 entries for 2 secondary groups"):
        run(parse_method({"name": "pcd", "tau": [0.1]}), groups)
    with pytest.raises(InvalidMethod, match="cannot be wrapped"):
        parse_method({"name": "crmogm", "weighting": {"name": "trimmed_mean", "trim_number": 0}})
    with pytest.raises(InvalidMethod, match="not available on this server"):
        run(parse_method("excess_mtl"), groups)
    for bad in ("cagrad", {"name": "krum"}, {"name": "fairgrad"}):
        with pytest.raises(InvalidMethod, match="Field required"):
            parse_method(bad)
    with pytest.raises(InvalidMethod, match=r"pcgrad.*seed"):
        parse_method({"name": "pcgrad", "seed": -1})


def test_solver_failure_is_degenerate() -> None:
    a = torch.randn(40, dtype=torch.float64)
    groups = {"a": [a], "b": [2 * a], "c": [-a]}  # rank one: quadprog fails without regularisation
    with pytest.raises(Degenerate, match="upgrad"):
        run(parse_method({"name": "upgrad", "norm_eps": 0, "reg_eps": 0}), groups)


def test_defaults_are_torchjds() -> None:
    import inspect

    from torchjd import aggregation as A
    from torchjd._linalg import QuadprogProjector

    def defaults(fn) -> dict[str, object]:
        return {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty and p.name not in ("pref_vector", "projector")
        }

    ours = {
        n: {f: v.default for f, v in spec_class(n).model_fields.items() if f not in ("name", "pref_vector")}
        for n in MTL
    }
    assert ours["upgrad"] == defaults(QuadprogProjector.__init__)
    assert ours["mgda"] == defaults(A.MGDA.__init__)
    assert ours["aligned_mtl"] == defaults(A.AlignedMTL.__init__)
    assert ours["cagrad"] == {"c": ours["cagrad"]["c"], **defaults(A.CAGrad.__init__)}
    assert ours["krum"]["n_selected"] == defaults(A.Krum.__init__)["n_selected"]
    assert ours["fairgrad"]["max_iters"] == defaults(A.FairGrad.__init__)["max_iters"]
    assert {f: ours["gradvac"][f] for f in ("beta", "eps")} == defaults(A.GradVac.__init__)
    assert ours["nash_mtl"] == defaults(A.NashMTL.__init__)
    assert ours["modo"] == defaults(A.MoDoWeighting.__init__)
    assert ours["pcd"] == defaults(A.PCD.__init__)
    assert ours["sdmgrad"] == defaults(A.SDMGradWeighting.__init__)
    assert {f: v for f, v in ours["crmogm"].items() if f != "weighting"} == defaults(
        A.CRMOGMWeighting.__init__
    )
    assert ours["graddrop"] == {"leak": defaults(A.GradDrop.__init__)["leak"], "seed": None}
    excess = {f: v.default for f, v in spec_class("excess_mtl").model_fields.items() if f != "name"}
    assert excess == defaults(A.ExcessMTL.__init__)
    assert math.isnan(float("nan"))


def test_warm_up_runs_every_available_method() -> None:
    from gradweight_server.engine.methods import warm_up

    warmed = warm_up()
    assert set(MTL) | {"nash"} == set(warmed)


LINEAR_UNDER_SCALING = {"mean": 1e-9, "sum": 1e-9, "constant": 1e-9, "config": 1e-6, "upgrad": 6e-2}


@pytest.mark.parametrize("name", sorted(LINEAR_UNDER_SCALING))
def test_linear_under_scaling(name: str) -> None:
    """torchjd's assert_linear_under_scaling: A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J)
    for positive c1, c2, a, b (with torchjd's own tolerance for UPGrad, whose reg_eps breaks exactness)."""
    k = 4
    spec = spec_for(name, k)
    j = matrix(k, seed=case_seed("linear", name), dtype=torch.float64)
    gen = torch.Generator().manual_seed(case_seed("linear-c", name))
    for _ in range(3):
        c1, c2 = (
            torch.rand(k, generator=gen, dtype=torch.float64),
            torch.rand(k, generator=gen, dtype=torch.float64),
        )
        a, b = (float(x) for x in torch.rand(2, generator=gen, dtype=torch.float64))
        x1 = run(spec, groups_of(c1.reshape(k, 1) * j)).flat
        x2 = run(spec, groups_of(c2.reshape(k, 1) * j)).flat
        x = run(spec, groups_of((a * c1 + b * c2).reshape(k, 1) * j)).flat
        tol = LINEAR_UNDER_SCALING[name]
        torch.testing.assert_close(x, a * x1 + b * x2, rtol=tol, atol=tol * float(x.abs().max()))
