"""gradweight.vision_unlearning against vision-unlearning 1.0.0's real classes (installed with --no-deps).

The trainer (`UnlearnerLora`, lora.py) imports diffusers, so its pydantic field is reproduced here rather
than imported; its update lines come from bench/trainer.py (`lora_update`, `lora_step`), which copy them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from engine.reference import seed_munba
from gradweight import Client, Munba, Nash, NonFinite, RemoteWeighting, Simple, Unauthorized
from gradweight.vision_unlearning import GradientWeightingMethodRemote as Remote
from pydantic import BaseModel, Field, ValidationError
from vision_unlearning.utils.gradient_weighting import (
    GradientWeightingMethod,
    GradientWeightingMethodMunba,
    GradientWeightingMethodNone,
    GradientWeightingMethodSimple,
)

BENCH = Path(__file__).resolve().parents[2] / "bench"
CPU = SimpleNamespace(device=torch.device("cpu"))  # what weight_grads reads of accelerate's Accelerator
UNUSED_URL = "http://127.0.0.1:9"


class Trainer(BaseModel):
    """UnlearnerLora's fields that matter here, as lora.py declares them."""

    lora_r: int = Field(default=32)
    max_grad_norm: float = Field(1.0)
    gradient_weighting_method: GradientWeightingMethod = Field(..., description="The weighting method.")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gradweight_bench_trainer", BENCH / "trainer.py")
        assert spec is not None
        assert spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture(scope="module")
def lora(bench: ModuleType) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rank-4 LoRA gradients of SD 1.5's UNet: 256 tensors, 797,184 parameters per group."""
    forget, retain = bench.lora_grads(4, seed=3)
    assert len(forget) == 256
    assert sum(g.numel() for g in forget) == 797_184
    return forget, retain


# ---- configuration -----------------------------------------------------------------------------------


def test_the_trainer_field_takes_it() -> None:
    m = Remote(url=UNUSED_URL, method=Munba())
    assert isinstance(m, GradientWeightingMethod)
    assert Trainer(gradient_weighting_method=m).gradient_weighting_method is m
    assert (
        Trainer.model_validate({"lora_r": 4, "gradient_weighting_method": m}).gradient_weighting_method is m
    )
    with Client(UNUSED_URL) as c, pytest.raises(ValidationError, match="GradientWeightingMethod"):
        Trainer(gradient_weighting_method=RemoteWeighting(c, "munba"))  # why this class exists


CONFIGS: list[dict[str, Any]] = [
    {"method": "munba"},
    {"method": Nash(max_norm=1.0), "mode": "gram"},
    {"method": Simple(forget_weight=0.3, retain_weight=1.0), "timeout": 30.0, "retries": 0},
    {"method": '{"name": "upgrad", "pref_vector": [1, 2]}', "on_nonfinite": "raise"},
    {"method": {"name": "gradvac", "seed": 0}, "timeout": None},
    {"method": "munba", "token": "s3cr3t-t0ken"},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_dump_is_plain_json_without_the_token_and_round_trips(config: dict[str, Any]) -> None:
    m = Remote(url="http://gpu-box:8000", **config)
    dumped = m.model_dump()
    text = m.model_dump_json()
    assert json.loads(json.dumps(dumped)) == dumped == json.loads(text)
    assert set(dumped) == {"url", "method", "mode", "timeout", "retries", "on_nonfinite"}
    for shown in (text, repr(m), str(m), json.dumps(dumped)):
        assert "s3cr3t" not in shown
    assert Remote.model_validate(dumped) == m
    assert Remote.model_validate_json(text) == m
    assert Remote(**dumped) == m
    # pydantic dumps a field by its declared class (no fields), so a trainer's config shows it with:
    trainer = Trainer(gradient_weighting_method=m)
    assert trainer.model_dump(serialize_as_any=True)["gradient_weighting_method"] == dumped


def test_the_readme_config_lines_build_a_valid_trainer_config() -> None:
    """The `+` lines of the README's diff blocks, run as written."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```diff\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        hyperparameters: dict[str, Any] = {}
        added = "\n".join(line[1:] for line in block.splitlines() if line.startswith("+"))
        exec(added, {"hyperparameters": hyperparameters})
        method = Trainer(**hyperparameters).gradient_weighting_method
        assert isinstance(method, Remote)
        assert method.url == "http://gpu-box:8000"
        removed = [line for line in block.splitlines() if line.startswith("-")]
        upstream = re.search(r"GradientWeightingMethod(\w+)\(", removed[-1])
        assert upstream is not None
        assert method.method.name == upstream[1].lower()  # Munba() -> munba, Simple(...) -> simple
        for option, value in re.findall(r"(\w+)=([-\d.]+)", removed[-1]):
            assert getattr(method.method, option) == float(value)


def test_method_options_survive_the_dump() -> None:
    m = Remote(url=UNUSED_URL, method=Simple(forget_weight=0.3, retain_weight=1.0))
    assert m.model_dump()["method"] == {"name": "simple", "forget_weight": 0.3, "retain_weight": 1.0}
    assert Remote(url=UNUSED_URL, method="simple") != m
    assert Remote(url=UNUSED_URL, method="munba", mode="gram") != Remote(url=UNUSED_URL, method="munba")


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "bogus"},
        {"method": {"name": "simple", "weight": 2}},
        {"method": "munba", "mode": "half"},
        {"method": "munba", "retries": -1},
        {"method": "munba", "timeout": 0},
        {"method": "munba", "mdoe": "gram"},
        {"method": "munba", "on_nonfinite": "skip"},
        {},
    ],
)
def test_bad_configs_fail_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Remote(url=UNUSED_URL, **bad)


def test_missing_vision_unlearning_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import gradweight` never imports it (test_client_package.py); its attribute does, on first use."""
    import gradweight

    assert gradweight.GradientWeightingMethodRemote is Remote
    for name in [n for n in sys.modules if n.split(".")[0] == "vision_unlearning"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gradweight.vision_unlearning")
    with pytest.raises(ImportError, match=r"pip install --no-deps vision-unlearning==1\.0\.0"):
        importlib.import_module("gradweight.vision_unlearning")
    with pytest.raises(ImportError, match="vision-unlearning"):
        _ = gradweight.GradientWeightingMethodRemote


# ---- weight_grads against upstream ---------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("mode", ["full", "gram"])
def test_none_and_simple_are_bit_identical_to_upstream(live_server: Any, lora: Any, mode: str) -> None:
    forget, retain = lora
    cases = [
        (GradientWeightingMethodNone(), "none"),
        (GradientWeightingMethodSimple(forget_weight=0.3, retain_weight=1.0), Simple(forget_weight=0.3)),
        (GradientWeightingMethodSimple(forget_weight=-0.7, retain_weight=1.9), '{"name": "simple", '
         '"forget_weight": -0.7, "retain_weight": 1.9}'),
    ]  # fmt: skip
    for upstream, method in cases:
        expected = upstream.weight_grads(forget, retain, CPU)
        with Remote(url=live_server.url, method=method, mode=mode) as m:
            got = m.weight_grads(forget, retain, CPU)
        assert got.shape == expected.shape == (797_184,)
        assert got.dtype == expected.dtype
        assert got.device == expected.device
        assert torch.equal(bits(got), bits(expected)), method


@pytest.mark.parametrize("mode", ["full", "gram"])
def test_munba_is_within_1e6_of_the_seed_formula_in_float64(live_server: Any, lora: Any, mode: str) -> None:
    forget, retain = lora
    reference = seed_munba(forget, retain)
    upstream = GradientWeightingMethodMunba().weight_grads(forget, retain, CPU)
    with Remote(url=live_server.url, method="munba", mode=mode) as m:
        got = m.weight_grads(forget, retain, CPU)
    assert got.shape == upstream.shape == (797_184, 1)
    assert got.dtype == upstream.dtype == torch.float32
    err = float((got.reshape(-1).double() - reference).abs().max() / reference.abs().max())
    assert err <= 1e-6, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["full", "gram"])
def test_result_has_the_gradients_dtype(live_server: Any, dtype: torch.dtype, mode: str) -> None:
    forget, retain = small_pair()
    forget, retain = [g.to(dtype) for g in forget], [g.to(dtype) for g in retain]
    for method in ("none", "simple", "munba"):  # upstream's munba supports only float32
        with Remote(url=live_server.url, method=method, mode=mode) as m:
            out = m.weight_grads(forget, retain, CPU)
        assert out.dtype == dtype, method
        if method != "munba":
            upstream = GradientWeightingMethodNone() if method == "none" else GradientWeightingMethodSimple()
            expected = upstream.weight_grads(forget, retain, CPU)
            assert expected.dtype == dtype
            torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


def test_numpy_in_numpy_out(live_server: Any) -> None:
    rng = np.random.default_rng(0)
    f = [rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)]
    r = [rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)]
    with Client(live_server.url) as c:
        out = RemoteWeighting(c, "munba").weight_grads(f, r, CPU)
        flat = RemoteWeighting(c, "simple").weight_grads(f, r, None)
    assert isinstance(out, np.ndarray)
    assert out.shape == (160, 1)
    expected = seed_munba([torch.from_numpy(a) for a in f], [torch.from_numpy(a) for a in r]).numpy()
    np.testing.assert_allclose(out[:, 0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert isinstance(flat, np.ndarray)
    assert flat.shape == (160,)


# ---- non-finite inputs (fp16 overflow) --------------------------------------------------------------


def small_pair(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    f = [torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen)]
    r = [torch.randn(4, 8, generator=gen) - 0.3 * f[0], torch.randn(8, 4, generator=gen) - 0.3 * f[1]]
    return f, r


@pytest.mark.parametrize("mode", ["full", "gram"])
def test_non_finite_gives_a_nan_gradient_and_is_counted(live_server: Any, caplog: Any, mode: str) -> None:
    forget, retain = small_pair()
    forget[1][2, 3] = float("inf")
    assert torch.isnan(GradientWeightingMethodMunba().weight_grads(forget, retain, CPU)).all()  # upstream
    with Remote(url=live_server.url, method="munba", mode=mode) as m:
        with caplog.at_level(logging.WARNING, logger="gradweight"):
            out = m.weight_grads(forget, retain, CPU)
        assert out.shape == (64, 1)
        assert out.dtype == torch.float32
        assert torch.isnan(out).all()
        assert m.nonfinite_steps == 1
        assert m.last is None  # no result: the server (full) or the local gram (gram) refused it
        assert "non-finite" in caplog.text
        forget[1][2, 3] = 1.0
        assert torch.isfinite(m.weight_grads(forget, retain, CPU)).all()
        assert m.nonfinite_steps == 1
        assert m.last is not None
        # upstream's `none` reads only the forget gradients; so does the check
        retain[0][0, 0] = float("nan")
        none = Remote(url=live_server.url, method="none")
        assert torch.equal(none.weight_grads(forget, retain, CPU), torch.cat([g.view(-1) for g in forget]))
        none.close()


@pytest.mark.parametrize("mode", ["full", "gram"])
def test_non_finite_can_raise(live_server: Any, mode: str) -> None:
    forget, retain = small_pair()
    retain[0][1, 1] = float("nan")
    with (
        Remote(url=live_server.url, method="simple", on_nonfinite="raise", mode=mode) as m,
        pytest.raises(NonFinite, match="'retain' key '0' contains NaN"),
    ):
        m.weight_grads(forget, retain, CPU)


def test_grad_scaler_skips_the_nan_step(live_server: Any, bench: ModuleType) -> None:
    """AMP: an overflowing step becomes a skipped step (and a smaller loss scale), not a dead run."""
    forget, retain = small_pair()
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in forget]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.zeros((), requires_grad=True))  # what `accelerator.backward` does first
    forget[0][0, 0] = float("inf")
    with Remote(url=live_server.url, method="munba") as m:
        bench.lora_update(params, m.weight_grads(forget, retain, CPU))
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(bool((p == 0).all()) for p in params)
    assert scaler.get_scale() == 2.0**15


# ---- training through lora.py's lines ------------------------------------------------------------------


def train(bench: ModuleType, weighting: Any, steps: int = 4) -> list[torch.Tensor]:
    """A small model with LoRA-like adapters (the base frozen), unlearned as `UnlearnerLora` does."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    base.requires_grad_(False)
    down = torch.nn.Parameter(torch.randn(4, 16) * 0.1)
    up = torch.nn.Parameter(torch.randn(8, 4) * 0.1)
    params = [down, up]

    def model(x: torch.Tensor) -> torch.Tensor:
        return base(x) + x @ down.T @ up.T

    gen = torch.Generator().manual_seed(1)
    xf, xr = torch.randn(32, 16, generator=gen), torch.randn(64, 16, generator=gen)
    yf, yr = torch.randn(32, 8, generator=gen), torch.randn(64, 8, generator=gen)
    mse = torch.nn.functional.mse_loss
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        bench.lora_step(params, weighting, lambda: -mse(model(xf), yf), lambda: mse(model(xr), yr), opt, CPU)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("mode", ["full", "gram"])
def test_a_few_training_steps_match_upstream(live_server: Any, bench: ModuleType, mode: str) -> None:
    start = train(bench, GradientWeightingMethodNone(), steps=0)
    pairs = [
        (GradientWeightingMethodSimple(forget_weight=0.3, retain_weight=1.0), Simple(forget_weight=0.3), 0.0),
        (GradientWeightingMethodMunba(), Munba(), 1e-5),
    ]
    for upstream, method, tol in pairs:
        expected = train(bench, upstream)
        with Remote(url=live_server.url, method=method, mode=mode) as m:
            got = train(bench, m)
        for g, e, s in zip(got, expected, start):
            assert float((e - s).abs().max()) > 1e-3  # the steps did move the parameters
            if tol == 0.0:
                assert torch.equal(bits(g), bits(e)), method
            else:
                assert float((g - e).abs().max()) <= tol * float(e.abs().max()), method


# ---- the HTTP client: made on first use, closable, never shared by copies -------------------------------


def test_client_lifecycle(live_server: Any) -> None:
    forget, retain = small_pair()
    m = Remote(url=live_server.url, method="nash")
    assert m.last is None
    first = m.weight_grads(forget, retain, CPU)
    assert m.last is not None
    twin = copy.deepcopy(m)
    assert twin == m
    assert twin.last is None
    m.close()
    assert m.last is None
    assert torch.equal(twin.weight_grads(forget, retain, CPU), first)  # the copy has its own client
    assert torch.equal(m.weight_grads(forget, retain, CPU), first)  # a new client after close()
    m.close()
    twin.close()


def test_token_from_the_field_or_the_environment(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(token="tok-123")
    forget, retain = small_pair()
    monkeypatch.delenv("GRADWEIGHT_TOKEN", raising=False)
    with Remote(url=server.url, method="munba", retries=0) as m, pytest.raises(Unauthorized):
        m.weight_grads(forget, retain, CPU)
    with Remote(url=server.url, method="munba", token="tok-123") as m:
        assert m.weight_grads(forget, retain, CPU).shape == (64, 1)
    monkeypatch.setenv("GRADWEIGHT_TOKEN", "tok-123")
    monkeypatch.setenv("GRADWEIGHT_URL", server.url)
    with Remote(method="munba") as m:
        assert m.url == server.url
        assert m.weight_grads(forget, retain, CPU).shape == (64, 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["full", "gram"])
def test_cuda_result_on_the_accelerator_device(live_server: Any, mode: str) -> None:
    forget, retain = small_pair()
    forget, retain = [g.cuda() for g in forget], [g.cuda() for g in retain]
    cuda = SimpleNamespace(device=torch.device("cuda"))
    expected = GradientWeightingMethodMunba().weight_grads(forget, retain, cuda)
    with Remote(url=live_server.url, method="munba", mode=mode) as m:
        got = m.weight_grads(forget, retain, cuda)
    assert got.device == expected.device
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    upstream = GradientWeightingMethodSimple(forget_weight=0.3, retain_weight=-1.7)
    with Remote(url=live_server.url, method=Simple(forget_weight=0.3, retain_weight=-1.7), mode=mode) as m:
        got = m.weight_grads(forget, retain, cuda)
    assert torch.equal(bits(got), bits(upstream.weight_grads(forget, retain, cuda)))
