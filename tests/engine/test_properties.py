"""Property tests over shapes, dtypes and scales (hypothesis), in the spirit of torchjd's _asserts.py."""

from __future__ import annotations

import math

import torch
from gradweight.errors import Degenerate
from gradweight.methods import Munba, Nash, Simple
from gradweight_server.engine import run
from gradweight_server.engine.methods.nash import residual
from hypothesis import given, settings
from hypothesis import strategies as st

from .reference import gram64, pair, seed_munba, seed_simple

shapes_st = st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=12)
dtype_st = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
cos_st = st.floats(-0.97, 0.97).filter(lambda c: abs(c) > 0.02)
scale_st = st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6])


def sized(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return [(2, *shapes[0]), *shapes[1:]]


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, cos=cos_st, scale=scale_st, seed=st.integers(0, 2**31 - 1))
def test_nash_condition_any_shape_and_scale(shapes, cos: float, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    forget, retain = pair(sized(shapes), cos, gen, torch.float64, scale_r=scale, scale_f=1 / scale)
    out = run(Nash(), {"retain": retain, "forget": forget})
    w = torch.tensor([out.weights["retain"], out.weights["forget"]], dtype=torch.float64)
    assert residual(gram64([retain, forget]), w) <= 1e-9
    assert math.isfinite(float(out.flat.norm()))


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, dtype=dtype_st, cos=cos_st, scale=scale_st, seed=st.integers(0, 2**31 - 1))
def test_munba_follows_seed_or_refuses(shapes, dtype, cos: float, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float16:
        scale = min(scale, 1e3)  # float16 tops out at 65504: larger inputs would arrive as inf
    forget, retain = pair(sized(shapes), cos, gen, dtype, scale_r=scale)
    try:
        out = run(Munba(), {"retain": retain, "forget": forget})
    except Degenerate:
        return
    assert bool(torch.isfinite(out.flat).all())
    expected = seed_munba(forget, retain)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    err = float((out.flat.double() - expected).abs().max())
    assert err <= tol * float(expected.abs().max())


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes_st,
    dtype=dtype_st,
    seed=st.integers(0, 2**31 - 1),
    fw=st.floats(-10, 10),
    rw=st.floats(-10, 10),
)
def test_simple_is_linear(shapes, dtype, seed: int, fw: float, rw: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    forget, retain = pair(sized(shapes), 0.3, gen, dtype)
    out = run(Simple(forget_weight=fw, retain_weight=rw), {"retain": retain, "forget": forget})
    expected = seed_simple(forget, retain, fw, rw)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    bound = tol * (abs(fw) + abs(rw)) * 2 + torch.finfo(dtype).tiny  # results below it flush to zero
    assert float((out.flat.double() - expected).abs().max()) <= bound


@settings(max_examples=30, deadline=None)
@given(cos=cos_st, seed=st.integers(0, 2**31 - 1), factor=st.floats(1e-3, 1e3))
def test_nash_weights_scale_inversely_and_result_is_scale_free(cos: float, seed: int, factor: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    forget, retain = pair([(50,)], cos, gen, torch.float64)
    a = run(Nash(), {"retain": retain, "forget": forget})
    b = run(Nash(), {"retain": [t * factor for t in retain], "forget": forget})
    assert b.weights["retain"] * factor == __import__("pytest").approx(a.weights["retain"], rel=1e-9)
    torch.testing.assert_close(a.flat, b.flat, rtol=1e-9, atol=1e-12)
