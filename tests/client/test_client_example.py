"""examples/unlearn.py, a few steps against the live server: forget loss rises, retain loss stays bounded."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from gradweight import Client, RemoteWeighting

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "unlearn.py"


@pytest.fixture(scope="module")
def unlearn() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gradweight_example_unlearn", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["full", "gram"])
def test_unlearning_raises_forget_loss(live_server: Any, unlearn: ModuleType, mode: str) -> None:
    data = unlearn.make_data()
    model = unlearn.make_model()
    unlearn.train(model, data)
    forget, retain = unlearn.split(data, 0)
    with Client(live_server.url) as c:
        weighting = RemoteWeighting(c, "nash", mode=mode)  # type: ignore[arg-type]
        history = unlearn.unlearn(weighting, model, forget, retain, steps=12)
    (f0, r0), (f1, r1) = history[0], history[-1]
    assert f1 > f0 + 1.0, history  # the forget class is being unlearned
    assert r1 < r0 + 0.5, history  # the rest is kept


def test_main_prints_history(
    live_server: Any, unlearn: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert unlearn.main(["--url", live_server.url, "--steps", "3"]) == 0
    assert capsys.readouterr().out.count("forget loss") == 4
