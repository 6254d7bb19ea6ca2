"""The client against a real server (the `live_server` / `make_server` fixtures of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from gradweight import (
    AsyncClient,
    Client,
    CombineResult,
    Degenerate,
    InvalidGradients,
    InvalidMethod,
    MalformedBody,
    MethodInfo,
    NonFinite,
    Overloaded,
    PayloadTooLarge,
    Retry,
    TransportError,
    Unauthorized,
    UnsupportedMediaType,
)
from gradweight.errors import from_problem

SHAPES = [(6, 5), (7,), (2, 3, 4), ()]


def _grads(rng: np.random.Generator, dtype: Any = np.float64, shapes: list[Any] = SHAPES) -> list[np.ndarray]:
    return [np.asarray(rng.standard_normal(s) * rng.uniform(0.5, 2.0), dtype=dtype) for s in shapes]


def _to(kind: str, xs: list[np.ndarray]) -> list[Any]:
    return [torch.from_numpy(x.copy()) for x in xs] if kind == "torch" else xs


def _flat(xs: list[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in xs])


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def methods(live_server: Any) -> list[MethodInfo]:
    with Client(live_server.url) as c:
        return c.methods()


def _weighting(methods: list[MethodInfo]) -> list[MethodInfo]:
    """The served methods that give weights (the elementwise ones have their own tests)."""
    extra = [m.model_extra or {} for m in methods]
    return [m for m, x in zip(methods, extra) if x.get("available", True) and x.get("gives_weights", True)]


def _pair_methods(methods: list[MethodInfo]) -> list[MethodInfo]:
    """Methods that take the forget/retain pair (every method does: min groups <= 2)."""
    return [m for m in _weighting(methods) if (m.groups or {}).get("min", 2) <= 2]


def _spec(m: MethodInfo, groups: Any = ("retain", "forget")) -> dict[str, Any]:
    """A valid spec from the method's JSON Schema: required options get a small in-range value, and a
    `seed` option is fixed so that randomised methods answer the same to the same request."""
    props = m.options.get("properties", {})
    spec: dict[str, Any] = {"name": m.name}
    for req in m.options.get("required", []):
        kind = props.get(req, {}).get("type")
        spec[req] = 0 if kind == "integer" else 0.5
    if m.name == "constant":
        spec["weights"] = {g: 0.5 + i for i, g in enumerate(groups)}
    if m.name == "crmogm":
        spec["weighting"] = {"name": "upgrad"}
    if "seed" in props:
        spec["seed"] = 7
    return spec


def _expected(res: CombineResult, groups: dict[str, list[np.ndarray]]) -> np.ndarray:
    return sum(res.weights[name] * _flat(g) for name, g in groups.items())  # type: ignore[return-value]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("layout", ["flat", "params"])
def test_every_method_both_layouts(
    live_server: Any, methods: list[MethodInfo], rng: np.random.Generator, kind: str, layout: str
) -> None:
    f, r = _grads(rng), _grads(rng)
    assert len(methods) >= 4
    with Client(live_server.url) as c:
        for m in _pair_methods(methods):
            res = c.combine(_to(kind, f), _to(kind, r), _spec(m), layout=layout)  # type: ignore[arg-type]
            assert res.method["name"] == m.name
            assert set(res.weights) >= {"forget"}
            assert all(math.isfinite(w) for w in res.weights.values())
            assert res.request_id
            assert res.device
            want = _expected(res, {"forget": f, "retain": r} if "retain" in res.weights else {"forget": f})
            cls = torch.Tensor if kind == "torch" else np.ndarray
            if layout == "flat":
                assert isinstance(res.scaled_grad, cls)
                assert res.scaled_grad.shape == (want.size,)
                got = res.scaled_grad
            else:
                assert list(res.params) == ["0", "1", "2", "3"]
                assert [tuple(t.shape) for t in res.tensors] == SHAPES
                assert all(isinstance(t, cls) for t in res.tensors)
                got = _flat(res.tensors)
            assert _rel(got, want) < 1e-12, m.name


def test_every_method_async(live_server: Any, methods: list[MethodInfo], rng: np.random.Generator) -> None:
    f, r = _to("torch", _grads(rng)), _to("torch", _grads(rng))

    async def go() -> list[CombineResult]:
        async with AsyncClient(live_server.url) as c:
            assert (await c.health()).ready
            assert (await c.info())["version"]
            assert [m.name for m in await c.methods()] == [m.name for m in methods]
            limit = asyncio.Semaphore(2)  # the server's default max_concurrency

            async def one(m: MethodInfo) -> CombineResult:
                async with limit:
                    return await c.combine(f, r, _spec(m))

            return list(await asyncio.gather(*(one(m) for m in _pair_methods(methods))))

    for res in asyncio.run(go()):
        assert res.scaled_grad is not None
        assert res.scaled_grad.dtype == torch.float64
        assert _rel(res.scaled_grad, _expected(res, {"forget": f, "retain": r})) < 1e-12


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_gram_mode_equals_full_mode(
    live_server: Any, methods: list[MethodInfo], rng: np.random.Generator, kind: str
) -> None:
    f, r = _to(kind, _grads(rng)), _to(kind, _grads(rng))
    checked = 0
    with Client(live_server.url) as c:
        for m in _pair_methods(methods):
            full = c.combine(f, r, _spec(m))
            try:
                gram = c.combine(f, r, _spec(m), mode="gram")
            except (InvalidMethod, InvalidGradients):  # methods that need the gradients themselves
                continue
            checked += 1
            assert gram.mode == "gram"
            assert type(gram.scaled_grad) is type(full.scaled_grad)
            assert _rel(gram.scaled_grad, full.scaled_grad) < 1e-6, m.name
            for name, w in full.weights.items():
                assert gram.weights[name] == pytest.approx(w, rel=1e-6, abs=1e-12)
    assert checked >= 3


def test_gram_mode_gram_has_the_servers_cpu_bytes(live_server: Any, rng: np.random.Generator) -> None:
    """CPU torch input: gram mode's host gram is the server's CPU scheme, so the same bits as the gram
    full mode reports (same machine, same tensors), whatever the layout of the trainer's tensors; the
    combine then has the seed's rounding, so equal weights give the full-mode result bit for bit."""
    shapes = [(40, 30), (7,), (2, 3, 4), (), (300, 5)]
    f, r = _to("torch", _grads(rng, np.float32, shapes)), _to("torch", _grads(rng, np.float32, shapes))
    bucket = torch.cat([x.reshape(-1) for x in f])  # a trainer's flat bucket: the tensors are one run
    packed = list(bucket.split([x.numel() for x in f]))
    with Client(live_server.url) as c:
        full = c.combine(f, r, "munba")
        if full.device != "cpu":
            pytest.skip("the server's gram is on a GPU")
        for forget in (f, [x.view(s) for x, s in zip(packed, shapes, strict=True)]):
            gram = c.combine(forget, r, "munba", mode="gram")
            assert gram.gram == full.gram
            assert gram.weights == full.weights
            assert torch.equal(gram.scaled_grad.view(torch.int32), full.scaled_grad.view(torch.int32))


def test_gram_mode_float32_params(live_server: Any, rng: np.random.Generator) -> None:
    f, r = _to("torch", _grads(rng, np.float32)), _to("torch", _grads(rng, np.float32))
    with Client(live_server.url) as c:
        full = c.combine(f, r, "nash", layout="params")
        gram = c.combine(f, r, "nash", layout="params", mode="gram")
    assert all(t.dtype == torch.float32 for t in gram.tensors)
    assert _rel(_flat(gram.tensors), _flat(full.tensors)) < 1e-6


def test_named_parameters_and_dtypes(live_server: Any, rng: np.random.Generator) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    names = [n for n, _ in model.named_parameters()]
    f = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    r = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with Client(live_server.url) as c:
        res = c.combine(f, r, {"name": "simple", "retain_weight": 0.25}, layout="params")
        assert list(res.params) == names
        for n in names:
            torch.testing.assert_close(res.params[n], f[n] + 0.25 * r[n])
        half = c.combine({k: v.half() for k, v in f.items()}, {k: v.half() for k, v in r.items()}, "nash")
        assert half.scaled_grad.dtype == torch.float16
        bf = c.combine(
            [v.bfloat16() for v in f.values()], [v.bfloat16() for v in r.values()], "nash", dtype="float32"
        )
        assert bf.scaled_grad.dtype == torch.float32
        npy = c.combine(
            [v.numpy() for v in f.values()], [v.numpy() for v in r.values()], "nash", dtype="float64"
        )
        assert npy.scaled_grad.dtype == np.float64


def test_multi_group_methods_and_state(live_server: Any, methods: list[MethodInfo]) -> None:
    multi = [m for m in _weighting(methods) if (m.groups or {}).get("max", 2) is None]
    assert multi, "nash takes any number of groups"
    groups = {
        f"task_{i}": [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
        for i in range(3)
    }
    with Client(live_server.url) as c:
        for m in multi:
            res = c.combine(groups=groups, method=_spec(m, groups))
            assert set(res.weights) == set(groups), m.name
            assert _rel(res.scaled_grad, _expected(res, groups)) < 1e-12
            if res.state is not None:  # stateful: the opaque state goes back and forth
                again = c.combine(groups=groups, method=_spec(m, groups), state=res.state)
                assert again.state is not None
            try:
                g = c.combine(groups=groups, method=_spec(m, groups), mode="gram", state=res.state)
            except (InvalidMethod, InvalidGradients):
                continue
            if res.state is None:
                assert _rel(g.scaled_grad, res.scaled_grad) < 1e-6, m.name


def test_weights_endpoint(live_server: Any, rng: np.random.Generator) -> None:
    g = rng.standard_normal((2, 50))
    k = g @ g.T
    with Client(live_server.url) as c:
        w = c.weights(k, "nash")
        a = np.array([w.weights["retain"], w.weights["forget"]])
        np.testing.assert_allclose((k @ a) * a, [1.0, 1.0], rtol=1e-9)  # the Nash condition K a = 1/a
        with pytest.raises(InvalidGradients):
            c.weights([[1.0, 2.0], [0.0, 1.0]], "nash")  # not symmetric


# ---- errors ------------------------------------------------------------------------------------------


def test_client_side_error_classes(live_server: Any, rng: np.random.Generator) -> None:
    f, r = _to("torch", _grads(rng)), _to("torch", _grads(rng))
    with Client(live_server.url, retries=0) as c:
        with pytest.raises(InvalidMethod) as info:
            c.combine(f, r, {"name": "no-such-method"})
        assert info.value.status == 422
        assert info.value.request_id
        with pytest.raises(InvalidGradients):
            c.combine(f, [torch.randn(3)], "nash")
        bad = [t.clone() for t in f]
        bad[1][2] = float("nan")
        with pytest.raises(NonFinite) as nf:
            c.combine(bad, r, "nash")
        assert "forget" in nf.value.detail
        with pytest.raises(Degenerate):
            c.combine([torch.zeros_like(t) for t in f], r, "nash")
    with Client(live_server.url, retries=0) as c, pytest.raises(InvalidGradients) as mixed:
        c.combine([np.ones(3, np.float16)], [np.ones(3, np.float32)], "simple")  # numpy only: no torch names
    assert "float16" in mixed.value.detail
    assert "torch" not in mixed.value.detail
    # bodies the client never builds, sent raw: the server's problem documents map to the same classes
    for content_type, body, cls in [
        ("application/octet-stream", b"\xff" * 12, MalformedBody),
        ("text/plain", b"hi", UnsupportedMediaType),
    ]:
        reply = httpx.post(
            live_server.url + "/v1/combine", content=body, headers={"Content-Type": content_type}
        )
        assert type(from_problem(reply.status_code, reply.json())) is cls


def test_token_and_size_limit(make_server: Any, rng: np.random.Generator) -> None:
    live = make_server(token="s3cret", max_body_bytes=4096, max_inflight_bytes=8192, warmup=False)
    f, r = _grads(rng, np.float32), _grads(rng, np.float32)
    with Client(live.url, retries=0) as c, pytest.raises(Unauthorized):
        c.combine(f, r, "nash")
    with Client(live.url, token="wrong", retries=0) as c, pytest.raises(Unauthorized):
        c.weights([[1.0, 0.0], [0.0, 1.0]], "nash")
    with Client(live.url, token="s3cret", retries=Retry(attempts=3, backoff=0.001)) as c:
        assert c.combine(f, r, "nash").weights["forget"] > 0
        big = [np.ones(4_000_000, np.float32)]  # 32 MB: refused before it is read, mid-upload
        with pytest.raises(PayloadTooLarge):
            c.combine(big, big, "nash")


class _FlakyProxy(httpx.BaseTransport):
    """Answers 503 overloaded (Retry-After: 0) to the first `n` requests, then forwards to the server."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen += 1
        if self.seen <= self.n:
            request.read()
            problem = Overloaded("busy").problem()
            return httpx.Response(503, json=problem, headers={"Retry-After": "0"})
        return self.inner.handle_request(request)


def test_retries_against_real_server(live_server: Any, rng: np.random.Generator) -> None:
    f, r = _grads(rng, np.float32, [(300, 300)]), _grads(rng, np.float32, [(300, 300)])
    proxy = _FlakyProxy(2)
    with Client(live_server.url, retries=Retry(attempts=3, backoff=0.001), transport=proxy) as c:
        res = c.combine(f, r, "simple")
    assert proxy.seen == 3
    assert _rel(res.scaled_grad, _flat(f) + _flat(r)) < 1e-6
    flaky = Client(live_server.url, retries=Retry(attempts=2, backoff=0.001), transport=_FlakyProxy(5))
    with flaky as c, pytest.raises(Overloaded):
        c.methods()


def test_unreachable_server_is_transport_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        Client(f"http://127.0.0.1:{port}", retries=Retry(attempts=2, backoff=0.001)) as c,
        pytest.raises(TransportError),
    ):
        c.health()


def test_request_id_echoed(live_server: Any) -> None:
    with Client(live_server.url) as c:
        w = c.weights([[2.0, 0.1], [0.1, 1.0]], "nash")
    assert w.request_id
    assert len(w.request_id) == 32
    assert json.dumps(w.method)
