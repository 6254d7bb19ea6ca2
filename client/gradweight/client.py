"""`Client` and `AsyncClient`: the same methods, blocking and async, over one httpx connection pool.

Everything but the I/O lives in `_Base` (building requests, decoding replies), so the twins differ only
in `_send`. Replies of /v1/combine are read into one buffer allocated from Content-Length and the
returned tensors are views of it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeAlias

import httpx

from . import gram as _gram
from . import progress as _progress
from .encoding import Body, combine_body, parse_reply
from .errors import APIError, GradweightError, InvalidMethod, MalformedBody, TransportError, from_problem
from .methods import MethodSpec, method_names, parse_method
from .retry import Retry, parse_retry_after
from .tensors import Buffer, Gradients, Group, as_group, device_of, is_torch
from .types import CombineResult, Health, Layout, MethodInfo, Mode, WeightsResult

__version__ = "0.1.0"
log = logging.getLogger("gradweight")

# Indirections so tests can record backoff instead of sleeping.
_sleep = time.sleep
_asleep = asyncio.sleep

MethodLike: TypeAlias = MethodSpec | Mapping[str, Any] | str
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
DEFAULT_TIMEOUT = 300.0
OCTET = "application/octet-stream"


def method_json(method: MethodLike) -> dict[str, Any]:
    """The spec as sent: known methods are validated (and defaults filled) here, so a typo fails before
    any upload; unknown names go to the server as given, which knows best."""
    if isinstance(method, MethodSpec):
        return method.model_dump(mode="json")
    if isinstance(method, str):
        text = method.strip()
        if not text.startswith("{"):
            return method_json({"name": text})
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InvalidMethod(f"method spec is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidMethod("method spec must be a JSON object with a `name`")
        return method_json(obj)
    spec = dict(method)
    if spec.get("name") in method_names():
        return parse_method(spec).model_dump(mode="json")
    return spec


def _check_args(method: MethodLike | None, layout: str, dtype: str | None) -> MethodLike:
    """Argument mistakes fail here, before any gradient is copied or sent; returns the method."""
    if method is None:
        raise ValueError("method is required, e.g. 'munba' or gradweight.Nash()")
    if layout not in ("flat", "params"):
        raise ValueError(f"layout must be 'flat' or 'params', not {layout!r}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {dtype!r}")
    return method


def _timeout(value: float | httpx.Timeout | None) -> httpx.Timeout:
    """The read timeout covers the server's compute, so it is the long one; connecting fails fast."""
    if isinstance(value, httpx.Timeout):
        return value
    if value is None:
        return httpx.Timeout(None, connect=10.0)
    return httpx.Timeout(value, connect=min(10.0, value))


@dataclass
class _Call:
    """One HTTP exchange, replayable on retry."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | Body | None = None
    torch_out: bool = False
    pin: bool = False
    ok_status: tuple[int, ...] = (200,)
    retry: bool = True


@dataclass
class _Reply:
    status: int
    headers: httpx.Headers
    content: bytes
    buffer: Buffer | None
    request_id: str | None

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError:
            raise MalformedBody(
                f"reply is not JSON (HTTP {self.status})", request_id=self.request_id
            ) from None


@dataclass
class _CombineCtx:
    groups: dict[str, Group]
    layout: Layout
    device: str
    torch_out: bool


def _error(status: int, headers: httpx.Headers, content: bytes) -> APIError:
    body: dict[str, Any] | None = None
    try:
        obj = json.loads(content) if content else None
        body = obj if isinstance(obj, dict) else None
    except ValueError:
        body = None
    return from_problem(
        status,
        body,
        request_id=headers.get("x-request-id"),
        retry_after=parse_retry_after(headers.get("retry-after")),
    )


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | Retry = 3,
        progress: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = Retry.of(retries)
        self.progress = progress
        self._headers = {"User-Agent": f"gradweight/{__version__}", "Accept-Encoding": "identity"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = _timeout(timeout)

    # ---- request building, shared by both twins -------------------------------------------------
    def _groups(
        self, forget: Gradients | None, retain: Gradients | None, groups: Mapping[str, Gradients] | None
    ) -> dict[str, Group]:
        if groups is not None:
            if forget is not None or retain is not None:
                raise ValueError("pass forget/retain or groups=, not both")
            if len(groups) < 1:
                raise ValueError("groups= is empty")
            return {str(name): as_group(g, str(name)) for name, g in groups.items()}
        if forget is None:
            raise ValueError("forget gradients are required")
        out = {"forget": as_group(forget, "forget")}
        if retain is not None:
            out["retain"] = as_group(retain, "retain")
        return out

    def _combine_call(
        self,
        forget: Gradients | None,
        retain: Gradients | None,
        method: MethodLike | None,
        *,
        groups: Mapping[str, Gradients] | None,
        layout: Layout,
        dtype: str | None,
        state: str | None,
    ) -> tuple[_Call, _CombineCtx]:
        method = _check_args(method, layout, dtype)
        named = self._groups(forget, retain, groups)
        first = next(iter(named.values())).arrays[0]
        body = combine_body(named, method=method_json(method), state=state, progress=self.progress)
        params: dict[str, str] = {"layout": layout}
        if dtype:
            params["dtype"] = dtype
        device = device_of(first)
        call = _Call(
            "POST",
            "/v1/combine",
            params=params,
            headers={"Content-Type": OCTET, "Accept": OCTET, "Content-Length": str(body.length)},
            content=body,
            torch_out=is_torch(first),
            pin=device.startswith("cuda"),
        )
        return call, _CombineCtx(named, layout, device, call.torch_out)

    def _combine_result(self, reply: _Reply, ctx: _CombineCtx) -> CombineResult:
        buf = reply.buffer
        assert buf is not None
        header, meta = parse_reply(buf.view)
        infos = {t.name: t for t in header.tensors}

        def get(name: str) -> Any:
            t = infos.get(name)
            if t is None:
                raise MalformedBody(f"reply lacks tensor {name!r}", request_id=reply.request_id)
            return buf.tensor(t.dtype, t.shape, t.begin, t.end, ctx.device)

        flat, per_key = None, {}
        if ctx.layout == "flat":
            flat = get("scaled_grad")
        else:
            per_key = {k: get(k) for k in next(iter(ctx.groups.values())).keys}
        return CombineResult(
            weights=meta.weights,
            method=meta.method,
            scaled_grad=flat,
            params=per_key,
            gram=meta.gram,
            device=meta.device,
            timing=meta.timing,
            state=meta.state,
            request_id=reply.request_id,
            mode="full",
        )

    @staticmethod
    def _gram_order(named: dict[str, Group]) -> list[str]:
        if set(named) == {"forget", "retain"}:
            return ["retain", "forget"]
        return list(named)

    def _weights_call(
        self, gram: Any, method: MethodLike, groups: Sequence[str] | None, state: str | None
    ) -> _Call:
        rows = gram.tolist() if hasattr(gram, "tolist") else gram
        payload: dict[str, Any] = {
            "method": method_json(method),
            "gram": [[float(x) for x in row] for row in rows],
        }
        if groups is not None:
            payload["groups"] = list(groups)
        if state is not None:
            payload["state"] = state
        return _Call(
            "POST",
            "/v1/weights",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            content=json.dumps(payload).encode(),
        )

    @staticmethod
    def _weights_result(reply: _Reply) -> WeightsResult:
        obj = reply.json()
        if not isinstance(obj, dict) or not isinstance(obj.get("weights"), dict):
            raise MalformedBody("weights reply lacks `weights`", request_id=reply.request_id)
        state = obj.get("state")
        if state is not None and not isinstance(state, str):
            state = json.dumps(state)
        return WeightsResult(
            method=obj.get("method") or {},
            weights={str(k): float(v) for k, v in obj["weights"].items()},
            state=state,
            request_id=reply.request_id,
        )

    @staticmethod
    def _methods_result(reply: _Reply) -> list[MethodInfo]:
        obj = reply.json()
        items = obj.get("methods", obj) if isinstance(obj, dict) else obj
        if not isinstance(items, list):
            raise MalformedBody("methods reply is not a list", request_id=reply.request_id)
        return [MethodInfo.model_validate(m) for m in items]

    @staticmethod
    def _detail(reply: _Reply) -> dict[str, Any]:
        try:
            obj = json.loads(reply.content) if reply.content else {}
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    def _request(self, call: _Call, request_id: str) -> httpx.Request:
        """The request for one try; a Body is passed as the stream itself (sized, replayable)."""
        headers = {**self._headers, **call.headers, "X-Request-ID": request_id}
        url = httpx.URL(self.base_url + call.path, params=call.params or None)
        ext = {"timeout": self._timeout.as_dict()}
        if isinstance(call.content, Body):
            headers["Host"] = url.netloc.decode("ascii")  # httpx adds it only for bodies it encodes itself
            return httpx.Request(call.method, url, headers=headers, stream=call.content, extensions=ext)
        return httpx.Request(call.method, url, headers=headers, content=call.content, extensions=ext)

    @staticmethod
    def _check_length(headers: httpx.Headers) -> int | None:
        length = headers.get("content-length")
        if length is None or headers.get("content-encoding", "identity") != "identity":
            return None
        return int(length)

    def _log_retry(self, call: _Call, attempt: int, exc: GradweightError, wait: float) -> None:
        log.warning("%s %s failed (%s); retry %d in %.2fs", call.method, call.path, exc, attempt + 1, wait)


def _wrap(exc: httpx.TransportError) -> TransportError:
    err = TransportError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    err.__cause__ = exc
    return err


class Client(_Base):
    """Blocking client. `Client(url, token=..., timeout=..., retries=...)`; use as a context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | Retry = 3,
        progress: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token=token, timeout=timeout, retries=retries, progress=progress)
        self._http = httpx.Client(timeout=self._timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- transport ------------------------------------------------------------------------------
    def _send_once(self, call: _Call, request_id: str) -> _Reply:
        request = self._request(call, request_id)
        try:
            response = self._http.send(request, stream=True)
            try:
                rid = response.headers.get("x-request-id", request_id)
                if response.status_code not in call.ok_status:
                    raise _error(response.status_code, response.headers, response.read())
                if isinstance(call.content, Body):
                    buf = self._read_into(response, call)
                    return _Reply(response.status_code, response.headers, b"", buf, rid)
                return _Reply(response.status_code, response.headers, response.read(), None, rid)
            finally:
                response.close()
        except httpx.TransportError as exc:
            raise _wrap(exc) from exc

    def _read_into(self, response: httpx.Response, call: _Call) -> Buffer:
        n = self._check_length(response.headers)
        if n is None or response.is_stream_consumed:
            data = response.read()
            if n is not None and len(data) != n:
                raise TransportError(f"reply of {len(data)} bytes, Content-Length says {n}")
            buf = Buffer(len(data), torch_out=call.torch_out, pin=call.pin)
            buf.view[:] = data
            return buf
        buf = Buffer(n, torch_out=call.torch_out, pin=call.pin)
        view, pos = buf.view, 0
        bar = _progress.bar(n, "download", self.progress)
        try:
            for chunk in response.iter_raw():
                end = pos + len(chunk)
                if end > n:
                    raise TransportError(f"reply longer than its Content-Length {n}")
                view[pos:end] = chunk
                bar.update(len(chunk))
                pos = end
        finally:
            bar.close()
        if pos != n:
            raise TransportError(f"reply truncated: {pos} of {n} bytes")
        return buf

    def _send(self, call: _Call) -> _Reply:
        request_id = uuid.uuid4().hex
        attempts = self.retry.attempts if call.retry else 1
        for attempt in range(attempts):
            try:
                return self._send_once(call, request_id)
            except GradweightError as exc:
                if attempt + 1 >= attempts or not self.retry.retryable(exc):
                    raise
                wait = self.retry.delay(attempt, exc)
                self._log_retry(call, attempt, exc, wait)
                _sleep(wait)
        raise AssertionError("unreachable")

    # ---- API ------------------------------------------------------------------------------------
    def combine(
        self,
        forget: Gradients | None = None,
        retain: Gradients | None = None,
        method: MethodLike | None = None,
        *,
        groups: Mapping[str, Gradients] | None = None,
        layout: Layout = "flat",
        dtype: str | None = None,
        mode: Mode = "full",
        state: str | None = None,
    ) -> CombineResult:
        """The weighted sum of the groups' gradients (POST /v1/combine, or /v1/weights in gram mode).

        forget/retain (or `groups={name: grads}` for multi-task methods) are lists of tensors, dicts
        key -> tensor, or numpy arrays; pass the previous result's `.state` for stateful methods.
        """
        if mode == "gram":
            return self._combine_gram(forget, retain, method, groups, layout, dtype, state)
        if mode != "full":
            raise ValueError(f"mode must be 'full' or 'gram', not {mode!r}")
        call, ctx = self._combine_call(
            forget, retain, method, groups=groups, layout=layout, dtype=dtype, state=state
        )
        return self._combine_result(self._send(call), ctx)

    def _combine_gram(
        self,
        forget: Gradients | None,
        retain: Gradients | None,
        method: MethodLike | None,
        groups: Mapping[str, Gradients] | None,
        layout: Layout,
        dtype: str | None,
        state: str | None,
    ) -> CombineResult:
        plan = _GramPlan.of(self, forget, retain, method, groups, layout, dtype)
        t0 = time.perf_counter()
        k = _gram.gram(plan.ordered)
        t1 = time.perf_counter()
        w = self.weights(k, plan.method, groups=plan.group_arg, state=state)
        t2 = time.perf_counter()
        out = plan.finish(k, w, (t0, t1, t2))
        return out

    def weights(
        self,
        gram: Any,
        method: MethodLike,
        *,
        groups: Sequence[str] | None = None,
        state: str | None = None,
    ) -> WeightsResult:
        """Weights from a gram matrix alone (POST /v1/weights): rows in `groups` order, by default
        ["retain", "forget"]."""
        return self._weights_result(self._send(self._weights_call(gram, method, groups, state)))

    def methods(self) -> list[MethodInfo]:
        """Every method the server offers (GET /v1/methods)."""
        return self._methods_result(self._send(_Call("GET", "/v1/methods")))

    def info(self) -> dict[str, Any]:
        """Version, device and limits of the server (GET /v1/info)."""
        obj = self._send(_Call("GET", "/v1/info")).json()
        return obj if isinstance(obj, dict) else {"info": obj}

    def health(self) -> Health:
        """Liveness and readiness; a not-ready server is an answer here, not an error."""
        live = self._send(_Call("GET", "/healthz"))
        ready = self._send(_Call("GET", "/readyz", ok_status=(200, 503), retry=False))
        return Health(live=live.status == 200, ready=ready.status == 200, detail=self._detail(ready))


class AsyncClient(_Base):
    """The async twin of `Client`: same constructor, same methods, awaited."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | Retry = 3,
        progress: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token=token, timeout=timeout, retries=retries, progress=progress)
        self._http = httpx.AsyncClient(timeout=self._timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send_once(self, call: _Call, request_id: str) -> _Reply:
        request = self._request(call, request_id)
        try:
            response = await self._http.send(request, stream=True)
            try:
                rid = response.headers.get("x-request-id", request_id)
                if response.status_code not in call.ok_status:
                    raise _error(response.status_code, response.headers, await response.aread())
                if isinstance(call.content, Body):
                    buf = await self._read_into(response, call)
                    return _Reply(response.status_code, response.headers, b"", buf, rid)
                return _Reply(response.status_code, response.headers, await response.aread(), None, rid)
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise _wrap(exc) from exc

    async def _read_into(self, response: httpx.Response, call: _Call) -> Buffer:
        n = self._check_length(response.headers)
        if n is None or response.is_stream_consumed:
            data = await response.aread()
            if n is not None and len(data) != n:
                raise TransportError(f"reply of {len(data)} bytes, Content-Length says {n}")
            buf = Buffer(len(data), torch_out=call.torch_out, pin=call.pin)
            buf.view[:] = data
            return buf
        buf = Buffer(n, torch_out=call.torch_out, pin=call.pin)
        view, pos = buf.view, 0
        bar = _progress.bar(n, "download", self.progress)
        try:
            async for chunk in response.aiter_raw():
                end = pos + len(chunk)
                if end > n:
                    raise TransportError(f"reply longer than its Content-Length {n}")
                view[pos:end] = chunk
                bar.update(len(chunk))
                pos = end
        finally:
            bar.close()
        if pos != n:
            raise TransportError(f"reply truncated: {pos} of {n} bytes")
        return buf

    async def _send(self, call: _Call) -> _Reply:
        request_id = uuid.uuid4().hex
        attempts = self.retry.attempts if call.retry else 1
        for attempt in range(attempts):
            try:
                return await self._send_once(call, request_id)
            except GradweightError as exc:
                if attempt + 1 >= attempts or not self.retry.retryable(exc):
                    raise
                wait = self.retry.delay(attempt, exc)
                self._log_retry(call, attempt, exc, wait)
                await _asleep(wait)
        raise AssertionError("unreachable")

    async def combine(
        self,
        forget: Gradients | None = None,
        retain: Gradients | None = None,
        method: MethodLike | None = None,
        *,
        groups: Mapping[str, Gradients] | None = None,
        layout: Layout = "flat",
        dtype: str | None = None,
        mode: Mode = "full",
        state: str | None = None,
    ) -> CombineResult:
        """See `Client.combine`; gram and local sums run in a worker thread so the loop stays free."""
        if mode == "gram":
            plan = _GramPlan.of(self, forget, retain, method, groups, layout, dtype)
            t0 = time.perf_counter()
            k = await asyncio.to_thread(_gram.gram, plan.ordered)
            t1 = time.perf_counter()
            w = await self.weights(k, plan.method, groups=plan.group_arg, state=state)
            t2 = time.perf_counter()
            return await asyncio.to_thread(plan.finish, k, w, (t0, t1, t2))
        if mode != "full":
            raise ValueError(f"mode must be 'full' or 'gram', not {mode!r}")
        # device-to-host copies (CUDA inputs) and host-to-device copies of the result off the loop
        call, ctx = await asyncio.to_thread(
            functools.partial(
                self._combine_call,
                forget,
                retain,
                method,
                groups=groups,
                layout=layout,
                dtype=dtype,
                state=state,
            )
        )
        reply = await self._send(call)
        return await asyncio.to_thread(self._combine_result, reply, ctx)

    async def weights(
        self,
        gram: Any,
        method: MethodLike,
        *,
        groups: Sequence[str] | None = None,
        state: str | None = None,
    ) -> WeightsResult:
        """See `Client.weights`."""
        return self._weights_result(await self._send(self._weights_call(gram, method, groups, state)))

    async def methods(self) -> list[MethodInfo]:
        """See `Client.methods`."""
        return self._methods_result(await self._send(_Call("GET", "/v1/methods")))

    async def info(self) -> dict[str, Any]:
        """See `Client.info`."""
        obj = (await self._send(_Call("GET", "/v1/info"))).json()
        return obj if isinstance(obj, dict) else {"info": obj}

    async def health(self) -> Health:
        """See `Client.health`."""
        live = await self._send(_Call("GET", "/healthz"))
        ready = await self._send(_Call("GET", "/readyz", ok_status=(200, 503), retry=False))
        return Health(live=live.status == 200, ready=ready.status == 200, detail=self._detail(ready))


@dataclass
class _GramPlan:
    """Gram mode's local half: which groups, in which gram order, and the final weighted sum."""

    method: dict[str, Any]
    named: dict[str, Group]
    order: list[str]
    layout: Layout
    dtype: str | None

    @classmethod
    def of(
        cls,
        client: _Base,
        forget: Gradients | None,
        retain: Gradients | None,
        method: MethodLike | None,
        groups: Mapping[str, Gradients] | None,
        layout: Layout,
        dtype: str | None,
    ) -> _GramPlan:
        method = _check_args(method, layout, dtype)
        named = client._groups(forget, retain, groups)
        if groups is None and "retain" not in named:
            raise ValueError("gram mode needs both forget and retain")
        return cls(method_json(method), named, client._gram_order(named), layout, dtype)

    @property
    def ordered(self) -> list[Group]:
        return [self.named[n] for n in self.order]

    @property
    def group_arg(self) -> list[str] | None:
        return None if self.order == ["retain", "forget"] else self.order

    def finish(self, k: list[list[float]], w: WeightsResult, t: tuple[float, float, float]) -> CombineResult:
        missing = [n for n in self.order if n not in w.weights]
        if missing:
            raise MalformedBody(f"weights reply lacks groups {missing}", request_id=w.request_id)
        weights = [w.weights[n] for n in self.order]
        flat, per_key = _gram.combine(self.ordered, weights, layout=self.layout, dtype=self.dtype)
        t3 = time.perf_counter()
        first = self.ordered[0].arrays[0]
        return CombineResult(
            weights=w.weights,
            method=w.method,
            scaled_grad=flat,
            params=per_key,
            gram=k,
            device=device_of(first),
            timing={
                "gram_ms": (t[1] - t[0]) * 1e3,
                "weights_ms": (t[2] - t[1]) * 1e3,
                "combine_ms": (t3 - t[2]) * 1e3,
            },
            state=w.state,
            request_id=w.request_id,
            mode="gram",
        )
