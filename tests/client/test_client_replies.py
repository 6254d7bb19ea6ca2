"""Every bad reply is a typed error, for both twins: a reply is checked against the request (count,
dtype, shapes, group names, finiteness) and bounded by what the request implies (no huge allocation, no
endless read); nothing but a GradweightError escapes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from gradweight import Client, GradweightError, MalformedReply, Simple, TransportError, wire
from gradweight.checks import Expected

Handler = Callable[[httpx.Request], httpx.Response]

F = [np.ones(4, np.float32)]
R = [np.full(4, 2.0, np.float32)]
GOOD_META = {"method": '{"name":"simple"}', "weights": '{"forget":1.0,"retain":1.0}', "device": "cpu"}


def octet(
    tensors: list[tuple[str, str, tuple[int, ...], bytes]], meta: dict[str, str] | None = None, **headers: str
) -> httpx.Response:
    head, _ = wire.build_header([(n, t, s) for n, t, s, _ in tensors], GOOD_META if meta is None else meta)
    body = head + b"".join(d for *_, d in tensors)
    return httpx.Response(
        200,
        content=body,
        headers={"Content-Type": "application/octet-stream", "X-Request-ID": "rid-1", **headers},
    )


def f32(values: list[float]) -> bytes:
    return np.asarray(values, np.float32).tobytes()


def answer(response: httpx.Response | Callable[[], httpx.Response]) -> Any:
    """A handler giving this reply (a fresh one per request when given a factory)."""

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return response() if callable(response) else response

    return handler


GOOD = ("scaled_grad", "F32", (4,), f32([3, 3, 3, 3]))
BAD_REPLIES = {
    "too few elements": lambda: octet([("scaled_grad", "F32", (2,), f32([3, 3]))]),
    "int32 vector": lambda: octet([("scaled_grad", "I32", (4,), np.full(4, 3, np.int32).tobytes())]),
    "float64 for float32": lambda: octet([("scaled_grad", "F64", (4,), np.full(4, 3.0).tobytes())]),
    "matrix for a vector": lambda: octet([("scaled_grad", "F32", (2, 2), f32([3, 3, 3, 3]))]),
    "wrong tensor name": lambda: octet([("grad", "F32", (4,), f32([3, 3, 3, 3]))]),
    "extra tensor": lambda: octet([GOOD, ("x", "F32", (1,), f32([0]))]),
    "NaN in the vector": lambda: octet([("scaled_grad", "F32", (4,), f32([3, math.nan, 3, 3]))]),
    "inf in the vector": lambda: octet([("scaled_grad", "F32", (4,), f32([3, 3, 3, -math.inf]))]),
    "NaN weight": lambda: octet([GOOD], {**GOOD_META, "weights": '{"forget":NaN,"retain":1.0}'}),
    "inf weight": lambda: octet([GOOD], {**GOOD_META, "weights": '{"forget":1e999,"retain":1.0}'}),
    "string weight": lambda: octet([GOOD], {**GOOD_META, "weights": '{"forget":"1","retain":1.0}'}),
    "weight of a group never sent": lambda: octet([GOOD], {**GOOD_META, "weights": '{"forget":1,"other":1}'}),
    "a group's weight missing": lambda: octet([GOOD], {**GOOD_META, "weights": '{"forget":1}'}),
    "no weights": lambda: octet([GOOD], {"method": '{"name":"simple"}', "device": "cpu"}),
    "weights not JSON": lambda: octet([GOOD], {**GOOD_META, "weights": "{nope"}),
    "timing not numbers": lambda: octet([GOOD], {**GOOD_META, "timing": '{"x":"slow"}'}),
    "not safetensors": lambda: httpx.Response(200, content=b"<html>proxy error</html>"),
    "header length 10^12": lambda: httpx.Response(200, content=(10**12).to_bytes(8, "little") + b"{}"),
    "Content-Length 10^15": lambda: httpx.Response(200, content=b"", headers={"Content-Length": str(10**15)}),
    "Content-Length not a number": lambda: httpx.Response(
        200, content=b"", headers={"Content-Length": "lots"}
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_combine_reply_is_malformed_reply(twin: Any, case: str) -> None:
    with twin(answer(BAD_REPLIES[case]), retries=0) as c, pytest.raises(MalformedReply) as info:
        c.combine(F, R, Simple())
    assert info.value.request_id
    assert "malformed reply" in str(info.value)


def test_good_crafted_reply_passes(twin: Any) -> None:
    """The crafted replies above differ from a valid one only in what each case names."""
    with twin(answer(octet([GOOD])), retries=0) as c:
        res = c.combine(F, R, Simple())
    np.testing.assert_array_equal(res.scaled_grad, [3, 3, 3, 3])
    assert res.request_id == "rid-1"


def test_params_layout_checks_each_key(twin: Any) -> None:
    f = {"a": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}
    good = [("a", "F32", (2, 3), f32([1] * 6)), ("b", "F32", (2,), f32([1, 1]))]
    with twin(answer(octet(good)), retries=0) as c:
        res = c.combine(f, f, "simple", layout="params")
    assert [tuple(t.shape) for t in res.tensors] == [(2, 3), (2,)]
    for bad in (
        [("a", "F32", (3, 2), f32([1] * 6)), good[1]],  # same count, other shape
        [("a", "F32", (2, 3), f32([1] * 6)), ("c", "F32", (2,), f32([1, 1]))],  # other key
        [good[0]],  # a key missing
    ):
        with twin(answer(octet(bad)), retries=0) as c, pytest.raises(MalformedReply):
            c.combine(f, f, "simple", layout="params")


def test_requested_dtype_is_checked(twin: Any) -> None:
    with twin(answer(octet([GOOD])), retries=0) as c, pytest.raises(MalformedReply, match="float64"):
        c.combine(F, R, "simple", dtype="float64")


def test_elementwise_methods_may_omit_weights(twin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec class with `gives_weights = False` (elementwise methods) is answered without weights."""
    monkeypatch.setattr(Simple, "gives_weights", False, raising=False)
    reply = octet([GOOD], {"method": '{"name":"simple"}', "device": "cpu"})
    with twin(answer(reply), retries=0) as c:
        assert c.combine(F, R, Simple()).weights is None


def test_unknown_method_reply_is_still_checked(twin: Any) -> None:
    reply = octet([GOOD], {"method": '{"name":"future"}', "device": "cpu"})
    with twin(answer(reply), retries=0) as c:
        assert c.combine(F, R, {"name": "future"}).weights is None
    short = octet([("scaled_grad", "F32", (2,), f32([3, 3]))])
    with twin(answer(short), retries=0) as c, pytest.raises(MalformedReply):
        c.combine(F, R, {"name": "future"})


class Endless(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A chunked reply that never ends, counting what the client pulled (bounded for the test's sake)."""

    def __init__(self, prefix: bytes, chunk: int = 1 << 16, most: int = 1 << 30) -> None:
        self.prefix, self.chunk, self.most, self.sent = prefix, b"\0" * chunk, most, 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.prefix
        self.sent = len(self.prefix)
        while self.sent < self.most:
            self.sent += len(self.chunk)
            yield self.chunk

    async def __aiter__(self) -> Any:
        for c in self:
            yield c


@pytest.mark.parametrize("valid_header", [True, False])
def test_endless_chunked_body_is_cut_off(twin: Any, valid_header: bool) -> None:
    head = octet([GOOD]).content[:-16] if valid_header else b"\x10\0\0\0\0\0\0\0" + b" " * 64
    stream = Endless(head)

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(200, stream=stream, headers={"Transfer-Encoding": "chunked"})

    with twin(handler, retries=0) as c, pytest.raises(MalformedReply):
        c.combine(F, R, "simple")
    limit = Expected("flat", "F32", ["0"], [(4,)], ["forget", "retain"], True).limit
    assert stream.sent <= limit + (1 << 16)


def test_truncated_and_overlong_bodies(twin: Any, no_sleep: list[float]) -> None:
    full = octet([GOOD]).content
    short = httpx.Response(200, content=full[:-3], headers={"Content-Length": str(len(full))})
    with twin(answer(short), retries=0) as c, pytest.raises(TransportError, match="truncated"):
        c.combine(F, R, "simple")
    long = httpx.Response(200, content=full + b"\0" * 8)
    with twin(answer(long), retries=0) as c, pytest.raises(MalformedReply):
        c.combine(F, R, "simple")
    chunked_short = httpx.Response(200, stream=Endless(full[:-3], most=0))
    with twin(answer(chunked_short), retries=0) as c, pytest.raises(TransportError, match="truncated"):
        c.combine(F, R, "simple")


def test_malformed_reply_is_not_retried(twin: Any, no_sleep: list[float]) -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return BAD_REPLIES["too few elements"]()

    with twin(handler) as c, pytest.raises(MalformedReply):
        c.combine(F, R, "simple")
    assert len(seen) == 1
    assert no_sleep == []


JSON_BAD = {
    "not JSON": lambda: httpx.Response(200, content=b"<html>"),
    "NaN weight": lambda: httpx.Response(200, content=b'{"method":{},"weights":{"retain":NaN,"forget":1}}'),
    "wrong groups": lambda: httpx.Response(200, json={"method": {}, "weights": {"a": 1.0, "forget": 1.0}}),
    "no weights": lambda: httpx.Response(200, json={"method": {}}),
    "a list": lambda: httpx.Response(200, json=[1, 2]),
    "oversized": lambda: httpx.Response(200, content=b"", headers={"Content-Length": str(10**12)}),
}


@pytest.mark.parametrize("case", sorted(JSON_BAD))
def test_bad_weights_reply(twin: Any, case: str) -> None:
    with twin(answer(JSON_BAD[case]), retries=0) as c, pytest.raises(MalformedReply):
        c.weights([[1.0, 0.0], [0.0, 1.0]], "nash")


def test_gram_mode_checks_the_weights(twin: Any) -> None:
    reply = httpx.Response(200, json={"method": {"name": "nash"}, "weights": {"retain": 1.0, "x": 1.0}})
    with twin(answer(reply), retries=0) as c, pytest.raises(MalformedReply, match="groups"):
        c.combine(F, R, "nash", mode="gram")


def test_bad_methods_and_endless_json(twin: Any) -> None:
    nameless = httpx.Response(200, json=[{"summary": "no name"}])
    with twin(answer(nameless), retries=0) as c, pytest.raises(MalformedReply):
        c.methods()

    def endless(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Endless(b"[", most=1 << 26))

    with twin(endless, retries=0) as c, pytest.raises(MalformedReply, match="longer"):
        c.info()


def test_endless_error_body_is_cut_off(twin: Any) -> None:
    stream = Endless(json.dumps({"code": "invalid-method", "detail": "no"}).encode(), most=1 << 30)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, stream=stream)

    with twin(handler, retries=0) as c, pytest.raises(GradweightError):
        c.info()
    assert stream.sent <= 1 << 18


def test_mangled_replies_raise_only_gradweight_errors(rng: np.random.Generator) -> None:
    """Random bytes flipped in, cut from or added to a valid reply: each call answers or raises a
    GradweightError, never anything else (seeded, 300 variants)."""
    good = octet([("scaled_grad", "F32", (4,), f32([3, 3, 3, 3]))]).content
    outcomes: set[str] = set()
    for _ in range(300):
        data = bytearray(good)
        how = rng.integers(3)
        if how == 0:
            for i in rng.integers(0, len(data), size=rng.integers(1, 4)):
                data[i] = int(rng.integers(256))
        elif how == 1:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            data += bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
        headers = {} if rng.integers(2) else {"Content-Length": str(len(data))}
        reply = httpx.Response(200, content=bytes(data), headers=headers)
        with Client("http://fake", transport=httpx.MockTransport(answer(reply)), retries=0) as c:
            try:
                c.combine(F, R, "simple")
                outcomes.add("ok")
            except GradweightError as exc:
                outcomes.add(type(exc).__name__)
    assert {"MalformedReply", "TransportError"} <= outcomes


class Pieces(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body arriving `size` bytes at a time."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size = data, size

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), self.size):
            yield self.data[i : i + self.size]

    async def __aiter__(self) -> Any:
        for c in self:
            yield c


@pytest.mark.parametrize("size", [1, 7, 100])
def test_reply_in_small_pieces(twin: Any, size: int) -> None:
    """The header may arrive over many chunks, and the payload split at any byte (not at elements)."""
    good = octet([GOOD]).content
    nan = octet([("scaled_grad", "F32", (4,), f32([3, 3, 3, math.nan]))]).content

    def handler(data: bytes) -> Handler:
        def reply(request: httpx.Request) -> httpx.Response:
            request.read()
            return httpx.Response(200, stream=Pieces(data, size), headers={"Content-Length": str(len(data))})

        return reply

    with twin(handler(good), retries=0) as c:
        np.testing.assert_array_equal(c.combine(F, R, "simple").scaled_grad, [3, 3, 3, 3])
    with twin(handler(nan), retries=0) as c, pytest.raises(MalformedReply, match="NaN"):
        c.combine(F, R, "simple")
