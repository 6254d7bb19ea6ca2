"""The same request gives the same bytes whatever torch's thread count and whichever thread runs it.

The passes use only elementwise operations, so torch's splitting of them across threads cannot change a
bit; these tests hold it to that with sizes whose blocks and thread shares end off any vector width.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from gradweight import blocks
from gradweight.methods import MethodSpec, Munba, Nash, Simple, parse_method
from gradweight_server.engine import run, weights_from_gram
from gradweight_server.engine.passes import gram

SIZES = [100_003, 7, 140_001, 1, 65_537]
THREADS = [1, 2, 3]


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def groups(k: int, dtype: torch.dtype, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    common = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
    out = {}
    for i in range(k):
        name = ("retain", "forget")[i] if k == 2 else f"task{i}"
        noise = [torch.randn(c.shape, generator=gen, dtype=torch.float64) for c in common]
        out[name] = [((0.5 * c + n) * 10.0**i).to(dtype) for c, n in zip(common, noise)]
    return out


def fingerprint(spec: MethodSpec, g: dict[str, list[torch.Tensor]]) -> tuple[Any, ...]:
    out = run(spec, g)
    return (out.weights, out.gram, out.flat.view(torch.uint8).numpy().tobytes())


def in_worker(fn: Callable[[], Any]) -> Any:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


CASES = [
    (Munba(), 2, torch.float32),
    (Nash(), 2, torch.float64),
    (Simple(forget_weight=0.3, retain_weight=1.0), 2, torch.float32),
    (Nash(), 4, torch.float32),
    (parse_method({"name": "upgrad"}), 3, torch.float32),
    (Munba(), 2, torch.bfloat16),
]


@pytest.mark.parametrize(("spec", "k", "dtype"), CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_same_bytes_at_any_thread_count_and_in_a_worker_thread(
    spec: MethodSpec, k: int, dtype: torch.dtype
) -> None:
    g = groups(k, dtype)
    results = []
    for n in THREADS:
        with threads(n):
            results.append(fingerprint(spec, g))
            results.append(in_worker(lambda: fingerprint(spec, g)))
    assert all(r == results[0] for r in results[1:])


def test_gram_bytes_at_one_and_two_threads_for_every_dtype() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        g = list(groups(3, dtype, seed=1).values())
        with threads(1):
            one = gram(g)[0]
        with threads(2):
            two = in_worker(lambda g=g: gram(g)[0])
        assert torch.equal(one, two), dtype


def test_weights_from_a_gram_are_the_same_in_a_worker_thread() -> None:
    k_matrix = gram(list(groups(4, torch.float32, seed=2).values()))[0]
    names = [f"task{i}" for i in range(4)]
    here = weights_from_gram(Nash(), k_matrix, names)[0]
    with threads(1):
        there = in_worker(lambda: weights_from_gram(Nash(), k_matrix, names)[0])
    assert here == there


@pytest.mark.parametrize(("spec", "k", "dtype"), CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_passes_shared_between_threads_give_the_same_bytes(
    spec: MethodSpec, k: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blocks, "SHARE_WIDTH", 1 << 15)  # several shared combine items, the last one short
    monkeypatch.setattr(blocks, "PARTIALS_BYTES", 3 << 11)  # the gram's partials in windows of a few
    g = groups(k, dtype)
    want = fingerprint(spec, g)
    for n in (2, 3):
        out = run(spec, g, threads=n)
        assert (out.weights, out.gram, out.flat.view(torch.uint8).numpy().tobytes()) == want, n


def test_share_runs_every_item_once_raises_a_helpers_error_and_restores_the_thread_count() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def note(i: int) -> None:
        with lock:
            seen.append(i)

    with threads(2):
        blocks.share(range(500), note, 3)
        assert torch.get_num_threads() == 2
    assert sorted(seen) == list(range(500))

    def fail_at_7(i: int) -> None:
        if i == 7:
            raise ValueError("item 7")

    with pytest.raises(ValueError, match="item 7"):
        blocks.share(range(200), fail_at_7, 2)
