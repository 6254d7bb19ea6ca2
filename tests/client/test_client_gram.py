"""Gram mode's local half: float64-accumulated gram and the weighted sum, for torch and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradweight import blocks
from gradweight import gram as G
from gradweight.tensors import as_group


def _groups(rng: np.random.Generator, k: int, dtype: type = np.float32) -> list[list[np.ndarray]]:
    shapes = [(5, 3), (7,), (2, 2, 2)]
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(k)]


def test_gram_matches_float64_reference(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(G, "lanes_for", lambda k, numel, cuda=False: 4)  # exercise chunks on small inputs
    raw = _groups(rng, 3)
    flat = np.stack([np.concatenate([a.reshape(-1) for a in g]).astype(np.float64) for g in raw])
    want = flat @ flat.T
    for conv in (lambda a: a, torch.from_numpy):
        got = G.gram([as_group([conv(a) for a in g], "g") for g in raw])
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert got[0][1] == got[1][0]


def test_gram_float32_accumulates_in_float64(rng: np.random.Generator) -> None:
    # 1e6 + many small numbers: float32 accumulation would lose them
    a = np.concatenate([[1e3], rng.uniform(0.5, 1.5, 200_000)]).astype(np.float32)
    got = G.gram([as_group([torch.from_numpy(a)], "x")])[0][0]
    want = float(np.dot(a.astype(np.float64), a.astype(np.float64)))
    assert abs(got - want) / want < 1e-12


def test_gram_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        G.gram([as_group([np.ones(3)], "a"), as_group([np.ones(4)], "b")])


@pytest.mark.parametrize("layout", ["flat", "params"])
@pytest.mark.parametrize("torch_in", [False, True])
def test_local_combine(rng: np.random.Generator, layout: str, torch_in: bool) -> None:
    raw = _groups(rng, 2, np.float64)
    w = [0.3, -1.7]
    groups = [as_group([torch.from_numpy(a) if torch_in else a for a in g], "g") for g in raw]
    flat, per_key = G.combine(groups, w, layout=layout, dtype=None)
    want = [w[0] * a + w[1] * b for a, b in zip(raw[0], raw[1], strict=True)]
    if layout == "flat":
        got = np.asarray(flat)
        np.testing.assert_allclose(got, np.concatenate([x.reshape(-1) for x in want]), rtol=1e-14)
    else:
        assert flat is None
        assert list(per_key) == ["0", "1", "2"]
        for k, x in zip(per_key, want, strict=True):
            assert tuple(per_key[k].shape) == x.shape
            np.testing.assert_allclose(np.asarray(per_key[k]), x, rtol=1e-14)


def test_local_combine_half_and_dtype(rng: np.random.Generator) -> None:
    a = torch.randn(100, dtype=torch.float16)
    b = torch.randn(100, dtype=torch.float16)
    flat, _ = G.combine([as_group([a], "a"), as_group([b], "b")], [0.5, 0.25], layout="flat", dtype="float32")
    assert flat.dtype == torch.float32
    torch.testing.assert_close(flat, 0.5 * a.float() + 0.25 * b.float())
    flat, _ = G.combine([as_group([a], "a"), as_group([b], "b")], [0.5, 0.25], layout="flat", dtype=None)
    assert flat.dtype == torch.float16


def test_gram_and_combine_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(G, "lanes_for", lambda k, numel, cuda=False: 8)
    a = [torch.randn(5, 7).bfloat16(), torch.randn(3).bfloat16()]
    b = [torch.randn(5, 7).bfloat16(), torch.randn(3).bfloat16()]
    groups = [as_group(a, "a"), as_group(b, "b")]
    fa = torch.cat([x.reshape(-1) for x in a]).double()
    fb = torch.cat([x.reshape(-1) for x in b]).double()
    want = [[float(fa @ fa), float(fa @ fb)], [float(fb @ fa), float(fb @ fb)]]
    np.testing.assert_allclose(G.gram(groups), want, rtol=1e-12)
    flat, _ = G.combine(groups, [2.0, -1.0], layout="flat", dtype=None)
    assert flat.dtype == torch.bfloat16
    torch.testing.assert_close(flat, (2 * fa - fb).bfloat16())


@pytest.mark.parametrize("layout", ["flat", "params"])
def test_torch_combine_is_the_seed_formula_bit_for_bit(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """CPU float32 tensors, stretches spanning many tensors and cutting some: round(w0 f), then
    round(acc + round(w1 r)), never fused, as the seed's `fw * cat(f) + rw * cat(r)`."""
    monkeypatch.setattr(blocks, "CPU_BLOCK", 64)
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 20), (20, 4), (3,), (0,), (50,), (7, 9)]
    f = [torch.randn(s, generator=gen) for s in shapes]
    r = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    w = [0.1 + 2**-30, -1.7]
    flat, per_key = G.combine([as_group(f, "f"), as_group(r, "r")], w, layout=layout, dtype=None)
    want = w[0] * torch.cat([x.reshape(-1) for x in f]) + w[1] * torch.cat([x.reshape(-1) for x in r])
    got = flat if layout == "flat" else torch.cat([per_key[str(i)].reshape(-1) for i in range(len(shapes))])
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    if layout == "params":
        assert [tuple(per_key[str(i)].shape) for i in range(len(shapes))] == shapes


def test_torch_gram_is_the_blocked_scheme(rng: np.random.Generator) -> None:
    """CPU torch input takes `blocks.blocked_gram` (the server's CPU bytes), whatever the tensors' layout;
    numpy input the lane scheme: both within float64 rounding of the exact gram."""
    from gradweight.blocks import blocked_gram

    raw = _groups(rng, 3)
    tensors = [[torch.from_numpy(a) for a in g] for g in raw]
    got = G.gram([as_group(g, "g") for g in tensors])
    flats = [[torch.cat([x.reshape(-1) for x in g])] for g in tensors]
    upper = blocked_gram(flats).tolist()
    assert [got[i][j] for i in range(3) for j in range(i, 3)] == upper
    np.testing.assert_allclose(G.gram([as_group(g, "g") for g in raw]), got, rtol=1e-13)


def test_torch_groups_need_one_dtype() -> None:
    groups = [
        as_group([torch.ones(3), torch.ones(2, dtype=torch.float64)], "a"),
        as_group([torch.ones(3), torch.ones(2)], "b"),
    ]
    with pytest.raises(ValueError, match="one dtype"):
        G.gram(groups)


def test_host_passes_run_on_one_thread_and_restore_the_count() -> None:
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with G.one_thread():
            seen.append(torch.get_num_threads())
        groups = [as_group([torch.randn(300)], "a"), as_group([torch.randn(300)], "b")]
        G.gram(groups)
        G.combine(groups, [0.5, 2.0], layout="flat", dtype=None)
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shapes", [[(6,)], [(0,), (4, 3), (0, 2), (5,)]])
def test_gram_mode_sums_into_a_copy_of_the_first_group_never_into_an_input(
    shapes: list[tuple[int, ...]],
) -> None:
    """The first group's run is a fresh copy (one tensor, or several, empty ones among them) that the
    combine overwrites with the seed's sum; the inputs stay as they were. Other dtypes take no copy."""
    from gradweight.gram_mode import GramPlan
    from gradweight.types import WeightsResult

    gen = torch.Generator().manual_seed(5)
    f = [torch.randn(s, generator=gen) for s in shapes]
    r = [torch.randn(s, generator=gen) for s in shapes]
    copies = [t.clone() for t in f + r]
    named = {"forget": as_group(f, "forget"), "retain": as_group(r, "retain")}
    plan = GramPlan.of(named, {"name": "munba"}, "flat", None)
    k = plan.gram()
    assert plan.kept is not None
    weights = WeightsResult(method={"name": "munba"}, weights={"retain": 0.25 + 2**-30, "forget": -1.5})
    got = plan.finish(k, weights, (0.0, 0.0, 0.0)).scaled_grad
    assert got is plan.kept
    cat = [torch.cat([t.reshape(-1) for t in g]) for g in (r, f)]
    want = weights.weights["retain"] * cat[0] + weights.weights["forget"] * cat[1]
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(f + r, copies, strict=True))
    assert GramPlan.of(named, {"name": "munba"}, "flat", "float16").kept is None
    half = {n: as_group([t.bfloat16() for t in g], n) for n, g in (("forget", f), ("retain", r))}
    assert GramPlan.of(half, {"name": "munba"}, "flat", None).kept is None
