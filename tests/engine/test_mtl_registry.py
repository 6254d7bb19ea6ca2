"""The registry is built from the method files; /v1/methods lists every method; every declared option
round-trips (spec -> echoed JSON -> spec); elementwise replies carry no weights, over HTTP too."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch
from gradweight import Client
from gradweight.methods import SPEC_CLASSES, filled, parse_method
from gradweight_server.engine.methods import REGISTRY

from .mtl_cases import matrix, names_for, options

NAMES = [str(c.model_fields["name"].default) for c in SPEC_CLASSES]


def test_v1_methods_lists_every_registered_method(live_server: Any) -> None:
    listed = httpx.get(f"{live_server.url}/v1/methods").json()
    assert [m["name"] for m in listed] == list(REGISTRY) == NAMES
    for m in listed:
        method = REGISTRY[m["name"]]
        assert m["gives_weights"] is (method.aggregate is None)
        assert m["torchjd"] == method.torchjd
        assert m["requires"] == method.extra
        assert m["options"]["type"] == "object"
        assert set(m["options"]["properties"]) == set(filled(parse_method(example(m["name"]))))


def example(name: str) -> dict[str, Any]:
    """Every option of the method set (defaults filled in by the spec), from the tests' non-default ones."""
    return {"name": name, **REGISTRY[name].warm_up, **options(name, 3)}


@pytest.mark.parametrize("name", NAMES)
def test_every_declared_option_round_trips(name: str) -> None:
    spec = parse_method(example(name))
    echoed = filled(spec)
    assert set(echoed) == set(type(spec).model_json_schema()["properties"])
    again = parse_method(json.loads(json.dumps(echoed)))
    assert again == spec
    assert filled(again) == echoed
    for option, value in options(name, 3).items():
        if isinstance(value, dict) and "name" in value:  # a nested spec echoes its own defaults
            assert echoed[option] == filled(parse_method(value)), option
        else:
            assert echoed[option] == json.loads(json.dumps(value)), option


def test_sdmgrad_lambda_is_spelled_lambda() -> None:
    spec = parse_method({"name": "sdmgrad", "lambda": 0.7})
    assert spec.lambda_ == 0.7  # type: ignore[attr-defined]
    assert filled(spec)["lambda"] == 0.7
    assert "lambda_" not in filled(spec)


def test_elementwise_replies_carry_no_weights(live_server: Any) -> None:
    j = matrix(3, seed=8)
    groups = {n: [j[i, :300].reshape(20, 15).clone()] for i, n in enumerate(names_for(3))}
    spec = {"name": "trimmed_mean", "trim_number": 1}
    with Client(live_server.url) as c:
        res = c.combine(groups=groups, method=spec)
    assert res.weights is None
    want = torch.sort(j[:, :300], dim=0).values[1]
    torch.testing.assert_close(torch.as_tensor(res.scaled_grad), want, rtol=0, atol=0)
    body = {
        "method": spec,
        "groups": {n: [g[0].reshape(-1).tolist()] for n, g in groups.items()},
    }
    doc = httpx.post(f"{live_server.url}/v1/combine", json=body, headers={"Accept": "application/json"})
    assert doc.status_code == 200, doc.text
    assert "weights" not in doc.json()
    gram = (j.double() @ j.double().T).tolist()
    refused = httpx.post(
        f"{live_server.url}/v1/weights", json={"method": spec, "gram": gram, "groups": names_for(3)}
    )
    assert refused.status_code == 422
    assert "elementwise" in refused.json()["detail"]


def test_readme_methods_table_lists_every_method() -> None:
    """One row per method, in registry order, with its spec's guarantee, stateful flag, and ² exactly on
    the elementwise ones."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Methods\n", 1)[1].split("| name | paper |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    names = [r[0].split("`")[1] for r in rows]
    assert names == list(REGISTRY)
    for cells, (name, method) in zip(rows, REGISTRY.items()):
        assert cells[-1].rstrip(" |") == method.spec.guarantee, name
        assert cells[3] == ("yes" if method.spec.stateful else "no"), name
        assert ("²" in cells[0]) == (not method.spec.gives_weights), name


@pytest.mark.parametrize("name", ["trimmed_mean", "graddrop"])
def test_elementwise_refuse_non_finite_inputs(name: str) -> None:
    """A NaN or infinity is refused with its group and key, even where the trimmed mean would drop it."""
    from gradweight.errors import NonFinite
    from gradweight_server.engine import run

    j = matrix(5, seed=2)
    groups = {n: [j[i, :100].clone(), j[i, 100:].clone()] for i, n in enumerate(names_for(5))}
    groups["task3"][1][7] = float("inf")
    spec = parse_method({"name": name, "trim_number": 1} if name == "trimmed_mean" else name)
    with pytest.raises(NonFinite, match="group 'task3' key 'b'"):
        run(spec, groups, keys=["a", "b"])


def test_inconsistent_declarations_are_refused() -> None:
    from gradweight.methods import Mean, TrimmedMean
    from gradweight_server.engine.methods import Method

    def fn(*args: Any) -> Any:
        raise AssertionError("never called")

    for bad in (
        Method(TrimmedMean, weights=fn),  # elementwise spec, weights declared
        Method(Mean, aggregate=fn),  # gives weights, declared elementwise
        Method(Mean),  # served, but computes nothing
        Method(Mean, weights=fn, aggregate=fn),
    ):
        with pytest.raises(TypeError):
            bad.check()
