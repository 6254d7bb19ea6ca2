"""Stateful methods (`gradvac`, `nash_mtl`) over 5 steps: the state goes through JSON text between steps
(as over HTTP, so any replica could serve any step) and every step equals torchjd's own stateful object."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from gradweight.errors import InvalidMethod
from gradweight.methods import parse_method
from gradweight_server.engine import run, weights_from_gram

from .mtl_cases import (
    case_seed,
    groups_of,
    matrix,
    names_for,
    spec_for,
    torchjd_aggregator,
    torchjd_weighting,
)
from .test_mtl_oracle import assert_close_rel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 5


def over_json(state: Any) -> Any:
    return json.loads(json.dumps(state, allow_nan=False))


def ours_step(spec, j: torch.Tensor, state: Any):
    out = run(spec, groups_of(j), state=None if state is None else over_json(state))
    w = torch.tensor(list(out.weights.values()), dtype=torch.float64)
    return out, w


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_gradvac_five_steps_equal_torchjd(k: int) -> None:
    spec = spec_for("gradvac", k)
    ref_w = torchjd_weighting(spec, k)
    ref_agg = torchjd_aggregator(spec, k)
    state = None
    for t in range(STEPS):
        j = matrix(k, seed=case_seed("gradvac", k, t))
        out, w = ours_step(spec, j, state)
        state = out.state
        assert state["step"] == t + 1
        torch.manual_seed(spec.seed + t)
        assert_close_rel(w, ref_w(j.double() @ j.double().T))
        torch.manual_seed(spec.seed + t)
        assert_close_rel(out.flat, ref_agg(j))
        # torchjd's EMA targets and ours agree too
        torch.testing.assert_close(
            torch.tensor(state["phi"], dtype=torch.float64), ref_w._phi_t, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(("k", "every"), [(2, 1), (3, 1), (5, 2), (10, 1)])
def test_nash_mtl_five_steps_equal_torchjd(k: int, every: int) -> None:
    spec = parse_method({"name": "nash_mtl", "max_norm": 1.5, "update_weights_every": every})
    ref_w = torchjd_aggregator(spec, k).weighting  # fed a square root of our gram: the same solve
    ref_agg = torchjd_aggregator(spec, k)  # fed the float32 matrix
    state = None
    for t in range(STEPS):
        j = matrix(k, seed=case_seed("nash_mtl", k, t))
        out, w = ours_step(spec, j, state)
        state = out.state
        gram = torch.tensor(out.gram, dtype=torch.float64)
        want = ref_w(torch.linalg.cholesky(gram)).double()
        assert_close_rel(w, want)
        assert_close_rel(out.flat, want @ j.double())
        assert state["prvs_alpha"] == pytest.approx(ref_w.prvs_alpha.tolist(), rel=1e-5)
        # torchjd on the float32 matrix: its float32 Gramian differs from ours by rounding, and NashMTL's
        # stopping rule (residual < 1e-3) turns that 1e-7 into up to ~1e-4 in the weights
        assert_close_rel(out.flat, ref_agg(j), rtol=1e-3)


def test_nash_mtl_interleaved_runs_do_not_share_state() -> None:
    """Two trainings served alternately by one process (pooled cvxpy problems) each match their own
    torchjd object: nothing leaks between requests except through `state`."""
    k = 4
    spec = parse_method("nash_mtl")
    refs = [torchjd_aggregator(spec, k).weighting for _ in range(2)]
    states: list[Any] = [None, None]
    for t in range(3):
        for run_id in range(2):
            j = matrix(k, seed=case_seed("interleave", run_id, t))
            out, w = ours_step(spec, j, states[run_id])
            states[run_id] = out.state
            gram = torch.tensor(out.gram, dtype=torch.float64)
            assert_close_rel(w, refs[run_id](torch.linalg.cholesky(gram)).double())


def test_weights_endpoint_path_carries_state() -> None:
    k = 3
    spec = spec_for("gradvac", k)
    names = names_for(k)
    j = matrix(k, seed=5).double()
    gram = j @ j.T
    w1, s1 = weights_from_gram(spec, gram, names)
    w2, s2 = weights_from_gram(spec, gram, names, over_json(s1))
    assert s1["step"] == 1
    assert s2["step"] == 2
    ref = torchjd_weighting(spec, k)
    for t, got in enumerate([w1, w2]):
        torch.manual_seed(spec.seed + t)
        assert_close_rel(torch.tensor(list(got.values())), ref(gram))


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl"])
def test_foreign_state_is_refused(name: str) -> None:
    spec = spec_for(name, 3)
    j = matrix(3, seed=1)
    out = run(spec, groups_of(j))
    other = "nash_mtl" if name == "gradvac" else "gradvac"
    bad_states = [
        "not a dict",
        {"method": name},
        {**out.state, "method": other},
        {**out.state, "groups": ["x", "y", "z"]},
        {**out.state, "step": -1},
    ]
    for bad in bad_states:
        with pytest.raises(InvalidMethod, match="state"):
            run(spec, groups_of(j), state=bad)
    four = groups_of(matrix(4, seed=1))
    with pytest.raises(InvalidMethod, match="groups"):
        run(spec_for(name, 4), four, state=out.state)


def test_bad_state_values_are_refused() -> None:
    spec = spec_for("gradvac", 3)
    j = matrix(3, seed=2)
    state = run(spec, groups_of(j)).state
    with pytest.raises(InvalidMethod, match="phi"):
        run(spec, groups_of(j), state={**state, "phi": [[1.0, 2.0], [3.0, 4.0]]})
    spec = spec_for("nash_mtl", 3)
    state = run(spec, groups_of(j)).state
    with pytest.raises(InvalidMethod, match="prvs_alpha"):
        run(spec, groups_of(j), state={**state, "prvs_alpha": [1.0, "x", 2.0]})
    with pytest.raises(InvalidMethod, match="prvs_alpha"):
        run(spec, groups_of(j), state={**state, "prvs_alpha": [1.0]})


STATE_FIELD = {"modo": "lambda", "pcd": "sq_norm_ema", "sdmgrad": "w", "crmogm": "lambda"}
TORCHJD_BUFFER = {"modo": "_lambda", "pcd": "_sq_norm_ema", "sdmgrad": "_w", "crmogm": "_lambda"}


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("name", sorted(STATE_FIELD))
def test_gramian_stateful_five_steps_equal_torchjd(name: str, k: int) -> None:
    """Each step's weights and carried state equal torchjd's own object fed the same grams."""
    spec = spec_for(name, k)
    ref = torchjd_weighting(spec, k)
    state = None
    for t in range(STEPS):
        j = matrix(k, seed=case_seed(name, k, t))
        out, w = ours_step(spec, j, state)
        state = out.state
        assert state["step"] == t + 1
        gram = torch.tensor(out.gram, dtype=torch.float64)
        want = ref(gram)
        assert_close_rel(w, want, rtol=1e-12)
        assert_close_rel(out.flat, want @ j.double())
        ours_state = torch.tensor(state[STATE_FIELD[name]], dtype=torch.float64)
        assert_close_rel(ours_state, getattr(ref, TORCHJD_BUFFER[name]), rtol=1e-12)


def test_crmogm_carries_its_inner_methods_state() -> None:
    k = 3
    spec = parse_method(
        {"name": "crmogm", "weighting": {"name": "gradvac", "beta": 0.3, "seed": 4}, "alpha": 0.5}
    )
    ref = torchjd_weighting(spec, k)
    state = None
    for t in range(3):
        j = matrix(k, seed=case_seed("crmogm-gradvac", t))
        out, w = ours_step(spec, j, state)
        state = out.state
        assert state["inner"]["step"] == t + 1
        torch.manual_seed(4 + t)
        assert_close_rel(w, ref(torch.tensor(out.gram, dtype=torch.float64)), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(STATE_FIELD))
def test_new_stateful_refuse_foreign_state(name: str) -> None:
    spec = spec_for(name, 3)
    j = matrix(3, seed=1)
    out = run(spec, groups_of(j))
    field = STATE_FIELD[name]
    for bad in ({**out.state, "method": "gradvac"}, {**out.state, field: [1.0, 2.0]}, {"method": name}):
        with pytest.raises(InvalidMethod, match="state"):
            run(spec, groups_of(j), state=bad)
