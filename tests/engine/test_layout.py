"""The passes give the same bytes however a group's tensors lie in memory, and merge only what is adjacent.

A request body's group is one stretch of memory; an in-process trainer's gradients are separate tensors; a
body written by `safetensors.torch.save` has its keys in name order ("0", "1", "10", ...), not in the
engine's order. The gram and the combine fill the same lanes in the same order in all three cases.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gradweight import blocks
from gradweight.blocks import Packed, chunks, flat_runs
from gradweight.errors import InvalidGradients, NonFinite
from gradweight.gram_mode import GramPlan
from gradweight.methods import Munba, Simple
from gradweight.tensors import as_group
from gradweight.types import WeightsResult
from gradweight_server.engine import run

SHAPES = [(4, 320), (320, 4), (7,), (0,), (3, 5, 11), (70_001,), (1,), (2, 64_000), (9, 9), (5,), (6, 2)]
SHAPES += [(3,)]


def scattered(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def packed(tensors: list[torch.Tensor], order: list[int]) -> list[torch.Tensor]:
    """The tensors copied into one buffer in `order`, handed back as views in their own order."""
    buf = torch.cat([tensors[i].reshape(-1) for i in order])
    views: list[torch.Tensor | None] = [None] * len(tensors)
    at = 0
    for i in order:
        n = tensors[i].numel()
        views[i] = buf[at : at + n].view(tensors[i].shape)
        at += n
    return [v for v in views if v is not None]


def by_name(n: int) -> list[int]:
    return sorted(range(n), key=str)


def fingerprint(spec: Any, g: dict[str, list[torch.Tensor]]) -> tuple[Any, ...]:
    out = run(spec, g)
    return out.weights, out.gram, out.flat.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("spec", [Munba(), Simple(forget_weight=0.3, retain_weight=1.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_bytes_for_every_layout(spec: Any, dtype: torch.dtype) -> None:
    f, r = scattered(0, dtype), scattered(1, dtype)
    n = len(SHAPES)
    want = fingerprint(spec, {"forget": f, "retain": r})
    for order in (list(range(n)), by_name(n), list(reversed(range(n)))):
        got = fingerprint(spec, {"forget": packed(f, order), "retain": packed(r, order)})
        assert got == want, order
    mixed = fingerprint(spec, {"forget": packed(f, list(range(n))), "retain": r})
    assert mixed == want
    assert fingerprint(spec, {"forget": pack(f), "retain": pack(r)}) == want
    assert fingerprint(spec, {"forget": pack(f), "retain": [t.reshape(-1) for t in r]}) == want


def pack(tensors: list[torch.Tensor]) -> Packed:
    """The tensors back to back in one flat tensor, as the server's decode hands a request body's group."""
    return Packed(torch.cat([t.reshape(-1) for t in tensors]), [t.numel() for t in tensors])


def test_packed_is_one_run_and_cuts_its_views_only_when_asked() -> None:
    f = scattered(0)
    p = pack(f)
    assert flat_runs(p) == [p.flat]
    assert p._views is None
    assert len(p) == len(SHAPES)
    assert [v.tolist() for v in p] == [t.reshape(-1).tolist() for t in f]
    assert p[2].data_ptr() == p.flat[sum(t.numel() for t in f[:2]) :].data_ptr()


def test_packed_groups_are_checked_and_name_the_culprit() -> None:
    f, r = scattered(0), scattered(1)
    other = [t.reshape(-1) for t in r]
    other[4], other[5] = other[4][:-1], torch.cat([other[5], other[4][-1:]])
    with pytest.raises(InvalidGradients, match="key '4'"):
        run(Munba(), {"forget": pack(f), "retain": pack(other)})
    with pytest.raises(InvalidGradients, match="float"):
        run(Munba(), {"forget": pack([t.to(torch.int32) for t in f]), "retain": pack(r)})
    bad = [t.clone() for t in r]
    bad[7].view(-1)[5] = float("nan")
    with pytest.raises(NonFinite, match="group 'retain' key '7'"):
        run(Munba(), {"forget": pack(f), "retain": pack(bad)})


def test_a_body_group_is_one_run_and_a_name_ordered_one_is_not() -> None:
    f = scattered(0)
    n = len(SHAPES)
    runs = flat_runs(packed(f, list(range(n))))
    assert len(runs) == 1
    assert runs[0].numel() == sum(t.numel() for t in f)
    assert len(flat_runs(f)) == n - 1  # the empty tensor is dropped
    shuffled = flat_runs(packed(f, by_name(n)))
    assert 1 < len(shuffled) < n
    assert torch.equal(torch.cat(shuffled), torch.cat([t.reshape(-1) for t in f]))


def test_views_that_only_look_adjacent_are_not_merged() -> None:
    buf = torch.arange(24, dtype=torch.float32)
    m = buf.view(4, 6)
    t = m.t()  # transposed view, not contiguous: its memory order is not its element order
    assert [x.tolist() for x in flat_runs([buf[:0], t])] == [t.reshape(-1).tolist()]
    a, b = buf[:12], buf[12:].view(3, 4).t()  # adjacent pointer, but b is not contiguous
    runs = flat_runs([a, b])
    assert len(runs) == 2
    assert torch.equal(torch.cat(runs), torch.cat([a, b.reshape(-1)]))
    wide = torch.arange(4, dtype=torch.float64)
    narrow = wide.view(torch.float32)  # the same bytes under another dtype is a different tensor
    assert len(flat_runs([narrow[:4], narrow[4:]])) == 1
    other = torch.arange(4, dtype=torch.float32)
    assert len(flat_runs([other[:2], torch.arange(2, dtype=torch.float32)])) == 2


@pytest.mark.parametrize("width", [1, 5, 64, 1 << 16])
def test_chunks_cover_every_element_once_in_order(width: int) -> None:
    f, r = scattered(0), scattered(1)
    groups = [flat_runs(packed(f, list(range(len(SHAPES))))), flat_runs(r)]
    total = sum(t.numel() for t in f)
    seen = 0
    for start, n, parts in chunks(groups, width):
        assert start == seen
        assert 0 < n <= width
        for g, pieces in zip(groups, parts):
            assert sum(p.numel() for p in pieces) == n
            assert torch.equal(torch.cat(pieces), torch.cat(g)[start : start + n])
        seen += n
    assert seen == total


def reference_gram(flats: list[torch.Tensor]) -> list[float]:
    """The CPU gram's scheme written out plainly (the spec `blocks.blocked_gram` must keep): the groups
    widened whole, each stretch of `lanes` elements copied into a zeroed k x lanes scratch, one batched
    GEMM over its blocks of BATCH lanes, the partials added stretch by stretch, then folded pairwise."""
    k, numel = len(flats), flats[0].numel()
    cap = min(blocks.LANES, 1 << ((blocks.SCRATCH // k).bit_length() - 1), 1 << (numel - 1).bit_length())
    lanes = max(blocks.BATCH, cap)
    count = lanes // blocks.BATCH
    wide = torch.stack(flats).double()
    acc = torch.zeros(count, k, k, dtype=torch.float64)
    for start in range(0, numel, lanes):
        x = torch.zeros(k, lanes, dtype=torch.float64)
        n = min(lanes, numel - start)
        x[:, :n] = wide[:, start : start + n]
        xb = x.view(k, count, blocks.BATCH).transpose(0, 1)
        acc += torch.bmm(xb, xb.transpose(1, 2))
    while count > 1:
        count //= 2
        acc[:count] += acc[count : 2 * count]
    rows, cols = torch.triu_indices(k, k)
    return [float(v) for v in acc[0][rows, cols]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_gram_is_the_reference_scheme_and_gram_mode_has_the_servers_bytes(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, threads: int
) -> None:
    """The server's gram, for scattered and body-like groups, is `reference_gram` bit for bit; gram
    mode's local passes (the gram keeps the first group in the result tensor, the combine scales it in
    place) give the server's gram and combined gradient bytes, at 1 and 2 threads, inputs untouched."""
    monkeypatch.setattr(blocks, "LANES", 1 << 12)  # ~50 stretches, cut inside tensors
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        f, r = scattered(0, dtype), scattered(1, dtype)
        copies = [t.clone() for t in f + r]
        want = reference_gram([torch.cat([t.reshape(-1) for t in g]) for g in (r, f)])  # munba: retain first
        outs = [run(Munba(), {"forget": f, "retain": r})]
        outs.append(
            run(Munba(), {"forget": packed(f, by_name(len(f))), "retain": packed(r, list(range(len(r))))})
        )
        for out in outs:
            assert [out.gram[i][j] for i in range(2) for j in range(i, 2)] == want
        plan = GramPlan.of(
            {"forget": as_group(f, "forget"), "retain": as_group(r, "retain")},
            {"name": "munba"},
            "flat",
            None,
        )
        k = plan.gram()
        assert plan.kept is not None
        assert k == outs[0].gram
        weights = WeightsResult(method={"name": "munba"}, weights=outs[0].weights)
        got = plan.finish(k, weights, (0.0, 0.0, 0.0)).scaled_grad
        assert got is plan.kept
        assert got.view(torch.uint8).numpy().tobytes() == outs[0].flat.view(torch.uint8).numpy().tobytes()
        assert all(torch.equal(a, b) for a, b in zip(f + r, copies, strict=True))
    finally:
        torch.set_num_threads(before)
