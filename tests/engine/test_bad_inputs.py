"""Degenerate and invalid inputs raise typed errors; never a NaN or infinite result."""

from __future__ import annotations

import math

import pytest
import torch
from gradweight.errors import Degenerate, InvalidGradients, NonFinite
from gradweight.methods import Munba, Nash, NoWeighting, Simple
from gradweight_server.engine import run, weights_from_gram

from .reference import pair

METHODS = [NoWeighting(), Simple(), Munba(), Nash()]


def fresh(n: int = 3, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return pair([(4, 5), (7,), (2, 3, 2)][:n], -0.4, gen)


def test_zero_gradient_is_degenerate_for_gram_methods() -> None:
    forget, retain = fresh()
    zeros = [torch.zeros_like(t) for t in forget]
    for spec in (Munba(), Nash()):
        with pytest.raises(Degenerate, match="zero"):
            run(spec, {"retain": retain, "forget": zeros})
        with pytest.raises(Degenerate, match="zero"):
            run(spec, {"retain": zeros, "forget": forget})


def test_munba_orthogonal_and_collinear_are_degenerate() -> None:
    r = torch.tensor([1.0, 0.0, 2.0, 0.0])
    f = torch.tensor([0.0, 3.0, 0.0, 1.0])
    with pytest.raises(Degenerate, match="orthogonal"):
        run(Munba(), {"retain": [r], "forget": [f]})
    with pytest.raises(Degenerate, match="collinear"):
        run(Munba(), {"retain": [r], "forget": [4 * r]})
    with pytest.raises(Degenerate, match="collinear"):
        run(Munba(), {"retain": [r], "forget": [-0.5 * r]})


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: s.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("group", ["retain", "forget"])
def test_non_finite_input_names_group_and_key(spec, bad: float, group: str) -> None:
    if spec.name == "none" and group == "retain":
        pytest.skip("`none` ignores retain")
    forget, retain = fresh()
    target = forget if group == "forget" else retain
    target[1][3] = bad
    with pytest.raises(NonFinite, match=f"group '{group}' key 'b'"):
        run(spec, {"retain": retain, "forget": forget}, keys=["a", "b", "c"])


def test_result_overflow_is_degenerate_not_inf() -> None:
    big = torch.full((8,), 6e4, dtype=torch.float16)
    with pytest.raises(Degenerate, match="overflows"):
        run(Simple(forget_weight=1.0, retain_weight=1.0), {"retain": [big], "forget": [big]})


def test_gram_overflow_is_degenerate() -> None:
    """float32 squares cannot overflow the float64 gram; float64 ones beyond 1e154 do."""
    big = torch.full((64,), 1e160, dtype=torch.float64)
    with pytest.raises(Degenerate, match="overflow"):
        run(Nash(), {"retain": [big], "forget": [-big.flip(0) + 1e159]})


def test_nan_weight_never_returned() -> None:
    with pytest.raises(Degenerate):
        weights_from_gram(Munba(), [[1.0, 1.0], [1.0, 1.0]], ["retain", "forget"])


@pytest.mark.parametrize(
    ("retain", "forget", "message"),
    [
        ([torch.randn(3)], [torch.randn(4)], "shape"),
        ([torch.randn(3)], [torch.randn(3), torch.randn(2)], "tensors, expected"),
        ([torch.randn(3).double()], [torch.randn(3)], "differs"),
        ([torch.arange(3)], [torch.arange(3)], "not a float"),
        ([], [], "empty"),
        ([torch.empty(0)], [torch.empty(0)], "no elements"),
    ],
)
def test_invalid_gradients(retain: list[torch.Tensor], forget: list[torch.Tensor], message: str) -> None:
    with pytest.raises(InvalidGradients, match=message):
        run(Simple(), {"retain": retain, "forget": forget}, keys=[str(i) for i in range(len(retain))])


def test_pair_methods_refuse_other_groups() -> None:
    forget, retain = fresh()
    with pytest.raises(InvalidGradients, match="needs group 'retain'"):
        run(Munba(), {"forget": forget})
    with pytest.raises(InvalidGradients, match="takes groups"):
        run(Simple(), {"retain": retain, "forget": forget, "extra": forget})
    solo = run(Nash(), {"solo": forget})  # one group: a = 1/|g|, as for any k the Nash condition K a = 1/a
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in forget))
    assert solo.weights == {"solo": pytest.approx(1.0 / norm, rel=1e-6)}  # float32 inputs


@pytest.mark.parametrize(
    "gram",
    [[[1.0, float("nan")], [float("nan"), 1.0]], [[1.0, 0.5], [0.4, 1.0]], [[1.0, 2.0], [2.0, 1.0]], [[1.0]]],
)
def test_bad_gram_refused(gram: list[list[float]]) -> None:
    with pytest.raises(InvalidGradients):
        weights_from_gram(Nash(), gram, ["retain", "forget"])
