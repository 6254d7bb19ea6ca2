"""Both twins against the in-process fake server, through one set of tests (the `twin` fixture runs
each for Client and AsyncClient): round trips, gram mode, errors, retries and their deadline."""

from __future__ import annotations

import inspect
import json
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from client_fakes import FakeServer
from gradweight import (
    AsyncClient,
    Client,
    CombineResult,
    InvalidMethod,
    Nash,
    Overloaded,
    Retry,
    Simple,
    TransportError,
)
from gradweight.errors import ERRORS_BY_CODE, RETRYABLE, APIError


def _pair(rng: np.random.Generator, torch_in: bool, dtype: Any = np.float32) -> tuple[list[Any], list[Any]]:
    shapes = [(4, 3), (5,), (2, 1, 3)]
    f = [rng.standard_normal(s).astype(dtype) for s in shapes]
    r = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if torch_in:
        return [torch.from_numpy(a) for a in f], [torch.from_numpy(a) for a in r]
    return f, r


def _flat(xs: list[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in xs])


@pytest.mark.parametrize("torch_in", [False, True])
@pytest.mark.parametrize("layout", ["flat", "params"])
def test_combine_round_trip(
    twin: Any, fake: FakeServer, rng: np.random.Generator, torch_in: bool, layout: str
) -> None:
    f, r = _pair(rng, torch_in)
    with twin(fake) as c:
        res = c.combine(f, r, Simple(forget_weight=2.0, retain_weight=0.5), layout=layout)  # type: ignore[arg-type]
    assert res.weights == {"forget": 2.0, "retain": 0.5}
    assert res.method["name"] == "simple"
    assert res.device == "cpu"
    assert res.timing["compute_ms"] > 0
    assert res.request_id == fake.requests[0].headers["x-request-id"]
    want = 2.0 * _flat(f) + 0.5 * _flat(r)
    kind = torch.Tensor if torch_in else np.ndarray
    if layout == "flat":
        assert isinstance(res.scaled_grad, kind)
        assert res.params == {}
        np.testing.assert_allclose(np.asarray(res.scaled_grad), want, rtol=1e-6)
    else:
        assert res.scaled_grad is None
        assert list(res.params) == ["0", "1", "2"]
        assert all(isinstance(t, kind) for t in res.tensors)
        assert [tuple(t.shape) for t in res.tensors] == [tuple(x.shape) for x in f]
        np.testing.assert_allclose(_flat(res.tensors), want, rtol=1e-6)
    req = fake.requests[0]
    assert req.url.params["layout"] == layout
    assert req.headers["content-type"] == "application/octet-stream"


def test_reply_tensors_are_views_of_one_buffer(twin: Any, fake: FakeServer, rng: np.random.Generator) -> None:
    f, r = _pair(rng, True)
    with twin(fake) as c:
        res = c.combine(f, r, "simple", layout="params")
        flat = c.combine(f, r, "simple")
    storages = {t.untyped_storage().data_ptr() for t in res.tensors}
    assert len(storages) == 1  # one reply buffer, every tensor a view of it
    assert flat.scaled_grad.untyped_storage().nbytes() >= flat.scaled_grad.numel() * 4
    assert flat.scaled_grad.untyped_storage().nbytes() < flat.scaled_grad.numel() * 4 + 4096  # + header only


def test_dict_inputs_and_dtype(twin: Any, fake: FakeServer, rng: np.random.Generator) -> None:
    f, r = _pair(rng, True)
    names = ["b.w", "a.w", "z"]
    with twin(fake) as c:
        res = c.combine(
            dict(zip(names, f, strict=True)),
            dict(zip(names, r, strict=True)),
            "nash",
            layout="params",
            dtype="float64",
        )
    assert list(res.params) == names
    assert all(t.dtype == torch.float64 for t in res.tensors)
    assert fake.requests[0].url.params["dtype"] == "float64"


@pytest.mark.parametrize("method", ["simple", "nash", {"name": "simple", "retain_weight": 3.0}])
@pytest.mark.parametrize("torch_in", [False, True])
def test_gram_mode_equals_full_mode(
    twin: Any, fake: FakeServer, rng: np.random.Generator, method: Any, torch_in: bool
) -> None:
    f, r = _pair(rng, torch_in, np.float64)
    with twin(fake) as c:
        full = c.combine(f, r, method)
        gram = c.combine(f, r, method, mode="gram")
    assert gram.mode == "gram"
    assert fake.requests[-1].url.path == "/v1/weights"
    assert gram.weights == pytest.approx(full.weights, rel=1e-12)
    np.testing.assert_allclose(np.asarray(gram.gram), np.asarray(full.gram), rtol=1e-12)
    a, b = np.asarray(gram.scaled_grad), np.asarray(full.scaled_grad)
    assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b)
    assert type(gram.scaled_grad) is type(full.scaled_grad)


def test_multi_groups_and_state_round_trip(twin: Any, fake: FakeServer, rng: np.random.Generator) -> None:
    groups = {f"task_{i}": [torch.randn(3, 2), torch.randn(4)] for i in range(3)}
    with twin(fake) as c:
        first = c.combine(groups=groups, method={"name": "sum"})
        assert json.loads(first.state or "") == {"step": 1}
        second = c.combine(groups=groups, method={"name": "sum"}, state=first.state)
        assert json.loads(second.state or "") == {"step": 2}
        g = c.combine(groups=groups, method={"name": "sum"}, mode="gram", state=second.state)
    assert json.loads(g.state or "") == {"step": 3}
    assert first.weights == {"task_0": 1.0, "task_1": 0.5, "task_2": pytest.approx(1 / 3)}
    np.testing.assert_allclose(np.asarray(g.scaled_grad), np.asarray(second.scaled_grad), rtol=1e-6)
    assert json.loads(fake.requests[-1].read())["groups"] == ["task_0", "task_1", "task_2"]


def test_weights_methods_info_health(twin: Any, fake: FakeServer) -> None:
    with twin(fake, token="s3cret") as c:
        w = c.weights([[2.0, 0.5], [0.5, 1.0]], Nash())
        assert set(w.weights) == {"retain", "forget"}
        assert w.weights["retain"] > 0
        assert [m.name for m in c.methods()] == ["none", "simple", "nash"]
        assert c.info()["version"] == "fake"
        assert c.health().ready
        fake.ready = False
        h = c.health()
        assert h.live
        assert not h.ready
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in fake.requests)
    assert json.loads(fake.requests[0].read())["gram"] == [[2.0, 0.5], [0.5, 1.0]]


def test_base_url_prefix_and_headers(twin: Any, fake: FakeServer) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"version": "x"})

    with twin(handler, "http://proxy:8080/gw/") as c:
        c.info()
    (req,) = seen
    assert str(req.url) == "http://proxy:8080/gw/v1/info"
    assert "authorization" not in req.headers
    assert req.headers["user-agent"].startswith("gradweight/")


def test_weights_accepts_arrays(twin: Any, fake: FakeServer) -> None:
    with twin(fake) as c:
        a = c.weights(np.array([[2.0, 0.5], [0.5, 1.0]]), "nash")
        b = c.weights(torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64), "nash")
    assert a.weights == b.weights


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_each_error_code_maps_to_its_class(
    twin: Any, fake: FakeServer, no_sleep: list[float], code: str
) -> None:
    cls = ERRORS_BY_CODE[code]
    fake.fail_with(code, times=10)
    with twin(fake, retries=2) as c, pytest.raises(cls) as info:
        c.weights([[1.0, 0.0], [0.0, 1.0]], "nash")
    err = info.value
    assert isinstance(err, APIError)
    assert err.status == cls.status
    assert err.code == code
    assert err.detail == "canned"
    tries = 3 if cls in RETRYABLE else 1
    assert len(fake.requests) == tries
    assert len(no_sleep) == tries - 1


def test_retry_after_is_honoured(
    twin: Any, fake: FakeServer, no_sleep: list[float], rng: np.random.Generator
) -> None:
    fake.fail_with("overloaded", retry_after="2")
    fake.fail_with("not-ready")
    f, r = _pair(rng, True)
    with twin(fake, retries=Retry(attempts=3, backoff=0.01)) as c:
        res = c.combine(f, r, "simple")
    assert isinstance(res, CombineResult)
    assert 2.0 <= no_sleep[0] <= 2.5
    assert no_sleep[1] < 0.1
    bodies = [req.read() for req in fake.requests]
    assert bodies[0] == bodies[2]  # the streamed body is replayed whole
    assert len({req.headers["x-request-id"] for req in fake.requests}) == 1


def test_backoff_grows_with_jitter() -> None:
    r = Retry(attempts=6, backoff=1.0, max_backoff=5.0)
    exc = TransportError("x")
    for attempt, cap in enumerate([1, 2, 4, 5, 5]):
        waits = {r.delay(attempt, exc) for _ in range(20)}
        assert all(cap / 2 <= w <= cap for w in waits)
        assert len(waits) > 1
    assert r.max_retry_after <= r.delay(0, Overloaded("x", retry_after=1e6)) <= 1.25 * r.max_retry_after


def test_connection_errors_retried_then_raised(twin: Any, fake: FakeServer, no_sleep: list[float]) -> None:
    fake.drop_connection(times=2)
    with twin(fake, retries=2) as c:
        assert c.health().live
    fake.drop_connection(times=5)
    with twin(fake, retries=1) as c, pytest.raises(TransportError, match="ConnectError"):
        c.methods()


def test_read_timeout_not_retried(twin: Any, no_sleep: list[float]) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("slow", request=request)

    c = twin(handler, retries=3)
    with c, pytest.raises(TransportError, match="ReadTimeout"):
        c.info()
    assert len(calls) == 1


def test_no_retry_on_4xx(twin: Any, fake: FakeServer, no_sleep: list[float]) -> None:
    with twin(fake, retries=5) as c, pytest.raises(InvalidMethod) as info:
        c.weights([[1.0, 0.0], [0.0, 1.0]], {"name": "no-such-method"})
    assert len(fake.requests) == 1
    assert no_sleep == []
    assert info.value.request_id == fake.requests[0].headers["x-request-id"]


def test_local_validation_fails_before_upload(twin: Any, fake: FakeServer) -> None:
    with twin(fake) as c:
        with pytest.raises(InvalidMethod):
            c.combine([torch.randn(3)], [torch.randn(3)], {"name": "simple", "bogus": 1})
        with pytest.raises(ValueError, match="layout"):
            c.combine([torch.randn(3)], [torch.randn(3)], "nash", layout="rows")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="dtype"):
            c.combine([torch.randn(3)], [torch.randn(3)], "nash", dtype="int8")
        with pytest.raises(ValueError, match="method"):
            c.combine([torch.randn(3)], [torch.randn(3)])
        with pytest.raises(ValueError, match="both"):
            c.combine([torch.randn(3)], None, "nash", mode="gram")
    assert fake.requests == []


def test_method_forms() -> None:
    from gradweight.client import method_json

    assert (
        method_json("nash")
        == method_json(Nash())
        == method_json({"name": "nash"})
        == {"name": "nash", "max_norm": None}
    )
    assert method_json('{"name": "simple", "retain_weight": 2}')["retain_weight"] == 2.0
    assert method_json('{"name": "future-method", "x": 1}') == {"name": "future-method", "x": 1}
    with pytest.raises(InvalidMethod, match="JSON"):
        method_json("{nope")
    with pytest.raises(InvalidMethod):
        method_json({"name": "nash", "max_norm": -1})


def test_non_problem_error_body(twin: Any, no_sleep: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with twin(handler) as c, pytest.raises(APIError) as info:
        c.info()
    assert "502" in str(info.value)


def test_truncated_reply_is_transport_error(twin: Any, no_sleep: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"abc", headers={"Content-Length": "10"})

    with (
        twin(handler, retries=0) as c,
        pytest.raises(TransportError),
    ):
        c.combine([np.ones(3, np.float32)], [np.ones(3, np.float32)], "simple")


def test_the_twins_have_one_face() -> None:
    """Same public methods, same signatures and docstrings (bar "See `Client.x`"), async in AsyncClient."""
    public = {n for n in dir(Client) if not n.startswith("_")} - {"close"}
    assert public == {n for n in dir(AsyncClient) if not n.startswith("_")} - {"aclose"}
    for name in public:
        sync, coro = getattr(Client, name), getattr(AsyncClient, name)
        if not callable(sync):
            continue
        assert inspect.iscoroutinefunction(coro), name
        assert inspect.signature(sync) == inspect.signature(coro), name
        assert sync.__doc__
        assert coro.__doc__ == f"See `Client.{name}`.", name


def test_retries_end_at_the_deadline(twin: Any, fake: FakeServer, no_sleep: list[float]) -> None:
    """A server that stays down: the default policy retries for 60 s of (virtual) time, then raises."""
    fake.drop_connection(times=10_000)
    with twin(fake) as c, pytest.raises(TransportError):
        c.info()
    assert 50 <= sum(no_sleep) <= 60
    assert 25 <= len(no_sleep) <= 100
    assert max(no_sleep) <= Retry().max_backoff


def test_retry_after_is_capped(twin: Any, fake: FakeServer, no_sleep: list[float]) -> None:
    fake.fail_with("overloaded", retry_after="100000", times=2)
    with twin(fake) as c:
        assert c.info()["version"] == "fake"
    assert len(no_sleep) == 2
    assert all(Retry().max_retry_after <= s <= 1.25 * Retry().max_retry_after for s in no_sleep)
    fake.fail_with("overloaded", retry_after="100000", times=2)
    with twin(fake, retries=Retry(deadline=5)) as c, pytest.raises(Overloaded):
        c.info()  # the wait would end past the deadline: raised at once, not slept


def test_retry_policy_arguments() -> None:
    assert Retry.of(None) == Retry()
    assert Retry.of(2).attempts == 3
    assert Retry.of(2).deadline == Retry().deadline
    with pytest.raises(ValueError, match="retries"):
        Retry.of(-1)
    with pytest.raises(TypeError):
        Retry.of(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deadline"):
        Retry(deadline=float("inf"))
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
