"""A protocol-faithful fake server (numpy, in-process via httpx.MockTransport) for the client's unit tests.

It parses request bodies with the same strict wire parser, computes `none`, `simple` and the two-group
`nash` closed form, and answers safetensors or problem+json like the real server, so the client's
encoding, decoding, retry and error paths are tested without a running service.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import numpy as np
from gradweight import wire
from gradweight.errors import ERRORS_BY_CODE, APIError, InvalidGradients, InvalidMethod


def fake_weights(spec: dict[str, Any], gram: list[list[float]], names: list[str]) -> dict[str, float]:
    name = spec.get("name")
    if name == "none":
        return {"forget": 1.0, "retain": 0.0}
    if name == "simple":
        return {
            "forget": float(spec.get("forget_weight", 1.0)),
            "retain": float(spec.get("retain_weight", 1.0)),
        }
    if name == "nash" and len(names) == 2:
        (krr, krf), (_, kff) = gram
        s = math.sqrt(krr * kff)
        ar = math.sqrt(s / (krr * (s + krf)))
        return {names[0]: ar, names[1]: 1.0 / ((s + krf) * ar)}
    if name == "sum":  # any number of groups: weights 1/(i+1), plus a counter carried in the state
        return {n: 1.0 / (i + 1) for i, n in enumerate(names)}
    raise InvalidMethod(f"unknown method {name!r}")


def _problem(err: APIError, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        err.status,
        content=json.dumps(err.problem()).encode(),
        headers={"Content-Type": "application/problem+json", **(headers or {})},
    )


class FakeServer:
    """Call log plus a queue of canned failures served before the real answers."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.failures: list[Callable[[httpx.Request], httpx.Response]] = []
        self.ready = True

    def fail_with(self, code: str, *, retry_after: str | None = None, times: int = 1) -> None:
        headers = {"Retry-After": retry_after} if retry_after else {}
        for _ in range(times):
            self.failures.append(lambda _r, c=code: _problem(ERRORS_BY_CODE[c]("canned"), headers))

    def drop_connection(self, times: int = 1) -> None:
        def drop(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        self.failures.extend([drop] * times)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            return self.failures.pop(0)(request)
        rid = request.headers.get("x-request-id", "srv")
        try:
            response = self._route(request)
        except APIError as err:
            response = _problem(err)
        response.headers["X-Request-ID"] = rid
        return response

    def _route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/readyz":
            if not self.ready:
                return _problem(ERRORS_BY_CODE["not-ready"]("warming up"))
            return httpx.Response(200, json={"status": "ready"})
        if path == "/v1/info":
            return httpx.Response(200, json={"version": "fake", "device": "cpu"})
        if path == "/v1/methods":
            return httpx.Response(
                200, json=[{"name": n, "summary": "", "needs_gram": True} for n in ("none", "simple", "nash")]
            )
        if path == "/v1/weights":
            obj = json.loads(request.read())
            names = obj.get("groups", ["retain", "forget"])
            out: dict[str, Any] = {
                "method": obj["method"],
                "weights": fake_weights(obj["method"], obj["gram"], names),
            }
            if "state" in obj or obj["method"]["name"] == "sum":
                out["state"] = json.dumps({"step": json.loads(obj.get("state") or '{"step": 0}')["step"] + 1})
            return httpx.Response(200, json=out)
        if path == "/v1/combine":
            return self._combine(request)
        return httpx.Response(404)

    def _combine(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        if request.headers.get("content-length") != str(len(body)):
            raise InvalidGradients("content-length mismatch")
        header = wire.parse(body)
        meta = header.metadata
        spec = json.loads(meta["method"]) if "method" in meta else {"name": request.url.params["method"]}
        names = json.loads(meta["groups"]) if "groups" in meta else ["retain", "forget"]
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for t in header.tensors:
            group, key = t.name.split("/", 1)
            np_dtype = wire.DTYPES[t.dtype][2]
            arrays.setdefault(group, {})[key] = np.frombuffer(
                body, dtype=np_dtype, count=t.numel, offset=t.begin
            ).reshape(t.shape)
        names = [n for n in names if n in arrays]
        keys = json.loads(meta["order"]) if "order" in meta else sorted(arrays[names[0]], key=int)
        flats = {n: np.concatenate([arrays[n][k].reshape(-1) for k in keys]) for n in names}
        g = np.stack([flats[n].astype(np.float64) for n in names])
        gram = (g @ g.T).tolist()
        weights = fake_weights(spec, gram, names)
        dtype = flats[names[0]].dtype
        combined = sum(weights[n] * flats[n].astype(np.float64) for n in names).astype(dtype)
        qdtype = request.url.params.get("dtype")
        if qdtype:
            combined = combined.astype(qdtype)
        tag = wire.TAG_BY_NAME[combined.dtype.name]
        if request.url.params.get("layout", "flat") == "params":
            parts, pos = [], 0
            for k in keys:
                shape = arrays[names[0]][k].shape
                n = int(np.prod(shape))
                parts.append((k, tag, shape, combined[pos : pos + n]))
                pos += n
        else:
            parts = [("scaled_grad", tag, combined.shape, combined)]
        out_meta = {
            "method": json.dumps(spec),
            "weights": json.dumps(weights),
            "gram": json.dumps(gram),
            "device": "cpu",
            "timing": json.dumps({"decode_ms": 0.1, "compute_ms": 0.2, "encode_ms": 0.3}),
        }
        if "state" in meta or spec["name"] == "sum":
            out_meta["state"] = json.dumps({"step": json.loads(meta.get("state", '{"step": 0}'))["step"] + 1})
        head, _ = wire.build_header([(p[0], p[1], p[2]) for p in parts], out_meta)
        content = head + b"".join(p[3].tobytes() for p in parts)
        return httpx.Response(
            200,
            stream=_Chunked(content),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(content))},
        )


class _Chunked(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A reply arriving in network-sized pieces, as from a socket."""

    def __init__(self, data: bytes, size: int = 65536) -> None:
        self.data, self.size = data, size

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), self.size):
            yield self.data[i : i + self.size]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk
