"""The client's sans-I/O core: every call written once, as a generator of steps the twins carry out.

A call yields three kinds of step: an HTTP exchange (`Exchange`: send the request, feed the reply's
chunks to the sink it opens), a wait between retries (`Sleep`), and CPU-heavy work (`Work`: host copies
of the inputs, the local gram, checking and viewing the result) that the async twin moves to a thread so
that its event loop stays free. Building requests, retrying, reading and checking replies all live here,
so `Client` and `AsyncClient` (client.py) are each the loop that performs the steps, and cannot drift.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import httpx

from .checks import Expected, check_weights, gives_weights, pair_or
from .encoding import Blob, Body, blobs_of, body_from_blobs
from .errors import GradweightError, InvalidMethod, MalformedBody, MalformedReply
from .gram_mode import GramPlan
from .methods import MethodSpec, method_names, parse_method
from .retry import Retry
from .sink import JSON_REPLY_CAP, BytesSink, ErrorSink, FileSink, Reply, Sink
from .tensors import Buffer, Gradients, Group, as_group, device_of, is_torch
from .types import CombineResult, FileResult, Health, Layout, MethodInfo, Mode, WeightsResult
from .wire import DTYPES, FLOAT_NAMES, TAG_BY_NAME, TensorInfo, parse

__version__ = "0.1.0"
log = logging.getLogger("gradweight")
_clock = time.monotonic  # the retry deadline's clock; tests advance a fake one as they "sleep"

T = TypeVar("T")
MethodLike: TypeAlias = MethodSpec | Mapping[str, Any] | str
DEFAULT_TIMEOUT = 300.0
OCTET = "application/octet-stream"
JSON = "application/json"


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
        try:
            text = json.dumps(spec, sort_keys=True)
        except (TypeError, ValueError):  # not JSON as given (a model inside, say): pydantic says
            return parse_method(spec).model_dump(mode="json")
        validated: dict[str, Any] = json.loads(_validated(text))
        return validated
    return spec


@functools.lru_cache(maxsize=64)
def _validated(spec_json: str) -> str:
    """A known method's spec validated and dumped, as JSON: a trainer sends the same spec every step,
    and pydantic's validation is most of a small request's client-side cost."""
    return json.dumps(parse_method(json.loads(spec_json)).model_dump(mode="json"))


def check_args(method: MethodLike | None, layout: str, dtype: str | None) -> MethodLike:
    """Argument mistakes fail here, before any gradient is copied or sent; returns the method."""
    if method is None:
        raise ValueError("method is required, e.g. 'munba' or gradweight.Nash()")
    if layout not in ("flat", "params"):
        raise ValueError(f"layout must be 'flat' or 'params', not {layout!r}")
    if dtype is not None and dtype not in FLOAT_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_NAMES)}, not {dtype!r}")
    return method


def _timeout(value: float | httpx.Timeout | None) -> httpx.Timeout:
    """The read timeout covers the server's compute, so it is the long one; connecting fails fast."""
    if isinstance(value, httpx.Timeout):
        return value
    if value is None:
        return httpx.Timeout(None, connect=10.0)
    return httpx.Timeout(value, connect=min(10.0, value))


# ---- steps ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One HTTP exchange, replayable on retry; `sink` reads the body of an expected status."""

    method: str
    path: str
    sink: Callable[[int, httpx.Headers, str | None], Sink]
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | Body | None = None
    ok_status: tuple[int, ...] = (200,)
    retry: bool = True


@dataclass(frozen=True)
class Exchange:
    """Step: send `request`, then feed the body to `open(status, headers)` and return its `finish()`."""

    request: httpx.Request
    call: Call
    request_id: str

    def open(self, status: int, headers: httpx.Headers) -> Sink:
        rid = headers.get("x-request-id") or self.request_id
        if status not in self.call.ok_status:
            return ErrorSink(status, headers, rid)
        return self.call.sink(status, headers, rid)


@dataclass(frozen=True)
class Sleep:
    """Step: wait before the next try."""

    seconds: float


@dataclass(frozen=True)
class Work:
    """Step: run `fn` (in a worker thread, in the async twin) and return its value."""

    fn: Callable[[], Any]


Step: TypeAlias = Exchange | Sleep | Work
Op: TypeAlias = Generator[Step, Any, T]


class Steps:
    """The steps of one call, for a twin's loop: iterate them, and set `outcome` to what each step gave
    (its value, or the exception it raised, which is thrown back into the call); `result` at the end."""

    def __init__(self, op: Op[Any]) -> None:
        self.op = op
        self.outcome: Any = None
        self.result: Any = None

    def __iter__(self) -> Steps:
        return self

    def __next__(self) -> Step:
        outcome, self.outcome = self.outcome, None
        try:
            if isinstance(outcome, Exception):
                return self.op.throw(outcome)
            return self.op.send(outcome)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None


def json_sink(limit: int = JSON_REPLY_CAP) -> Callable[[int, httpx.Headers, str | None], Sink]:
    return lambda status, headers, rid: BytesSink(status, headers, rid, limit)


# ---- the core --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Combine:
    """A combine request and how to read its reply into the result."""

    call: Call
    expected: Expected
    keys: list[str]
    device: str


def _weights_of(weights: Any, plan: _Combine, reply: Reply) -> dict[str, float] | None:
    """The reply's weights as floats; None for a method that gives none (elementwise; checked in sink)."""
    return None if weights is None else check_weights(weights, plan.expected.groups, reply.request_id)


class BaseClient:
    """Configuration and every call as an `Op`; the twins subclass it and only perform the steps."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | Retry | None = None,
        progress: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = Retry.of(retries)
        self.progress = progress
        self._headers = {"User-Agent": f"gradweight/{__version__}", "Accept-Encoding": "identity"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = _timeout(timeout)

    # ---- sending, with retries ---------------------------------------------------------------------
    def _request(self, call: Call, request_id: str) -> httpx.Request:
        """The request for one try; a Body is passed as the stream itself (sized, replayable)."""
        headers = {**self._headers, **call.headers, "X-Request-ID": request_id}
        url = httpx.URL(self.base_url + call.path, params=call.params or None)
        ext = {"timeout": self._timeout.as_dict()}
        if isinstance(call.content, Body):
            headers["Host"] = url.netloc.decode("ascii")  # httpx adds it only for bodies it encodes itself
            return httpx.Request(call.method, url, headers=headers, stream=call.content, extensions=ext)
        return httpx.Request(call.method, url, headers=headers, content=call.content, extensions=ext)

    def _send(self, call: Call) -> Op[Reply]:
        """Try until an answer, a final error, or the retry deadline (retry.py); one request ID for all."""
        request_id = uuid.uuid4().hex
        start = _clock()
        for attempt in itertools.count():
            try:
                reply: Reply = yield Exchange(self._request(call, request_id), call, request_id)
                return reply
            except GradweightError as exc:
                wait = self.retry.wait(attempt, exc, _clock() - start) if call.retry else None
                if wait is None:
                    raise
                log.warning(
                    "%s %s failed (%s); retry %d in %.2fs", call.method, call.path, exc, attempt + 1, wait
                )
                yield Sleep(wait)
        raise AssertionError("unreachable")

    # ---- combine -------------------------------------------------------------------------------------
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
        blobs: list[Blob],
        *,
        names: list[str],
        keys: list[str],
        order: list[str] | None,
        method: dict[str, Any],
        layout: Layout,
        dtype: str | None,
        state: str | None,
        alloc: Callable[[int], Buffer],
        device: str = "cpu",
    ) -> _Combine:
        """The request for blobs `<group>/<key>` and what its reply must be (checks.py)."""
        body = body_from_blobs(
            blobs, method=method, order=order, group_names=names, state=state, progress=self.progress
        )
        first = blobs[: len(keys)]
        expected = Expected(
            layout=layout,
            tag=TAG_BY_NAME[dtype] if dtype else first[0].tag,
            keys=keys,
            shapes=[b.shape for b in first],
            groups=names,
            weights_required=gives_weights(method),
            state_chars=len(state or ""),
        )
        params: dict[str, str] = {"layout": layout}
        if dtype:
            params["dtype"] = dtype
        progress = self.progress

        def sink(status: int, headers: httpx.Headers, rid: str | None) -> Sink:
            return FileSink(status, headers, rid, expected, alloc, progress)

        call = Call(
            "POST",
            "/v1/combine",
            sink,
            params=params,
            headers={"Content-Type": OCTET, "Accept": OCTET, "Content-Length": str(body.length)},
            content=body,
        )
        return _Combine(call, expected, keys, device)

    def _combine_of_arrays(
        self,
        named: dict[str, Group],
        method: dict[str, Any],
        layout: Layout,
        dtype: str | None,
        state: str | None,
    ) -> _Combine:
        blobs: list[Blob] = []
        for name, group in named.items():
            blobs.extend(blobs_of(name, group))  # device-to-host copies happen here
        first = next(iter(named.values()))
        device = device_of(first.arrays[0])
        torch_out = is_torch(first.arrays[0])
        return self._combine_call(
            blobs,
            names=list(named),
            keys=first.keys,
            order=first.keys if first.named else None,
            method=method,
            layout=layout,
            dtype=dtype,
            state=state,
            alloc=functools.partial(Buffer, torch_out=torch_out, pin=device.startswith("cuda")),
            device=device,
        )

    @staticmethod
    def _views(plan: _Combine, reply: Reply) -> list[TensorInfo]:
        """The reply's tensors in request order (the sink checked names, shapes, dtype and finiteness)."""
        assert reply.file is not None
        infos = {t.name: t for t in reply.file.header.tensors}
        return [infos[name] for name, _ in plan.expected.entries]

    def _combine_result(self, plan: _Combine, reply: Reply) -> CombineResult:
        assert reply.file is not None
        meta = reply.file.meta
        buf = reply.file.buffer
        arrays = [buf.tensor(t.dtype, t.shape, t.begin, t.end, plan.device) for t in self._views(plan, reply)]
        flat = arrays[0] if plan.expected.layout == "flat" else None
        per_key = {} if flat is not None else dict(zip(plan.keys, arrays, strict=True))
        return CombineResult(
            weights=_weights_of(meta.weights, plan, reply),
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

    def _combine(
        self,
        forget: Gradients | None,
        retain: Gradients | None,
        method: MethodLike | None,
        *,
        groups: Mapping[str, Gradients] | None,
        layout: Layout,
        dtype: str | None,
        mode: Mode,
        state: str | None,
    ) -> Op[CombineResult]:
        method = check_args(method, layout, dtype)
        if mode not in ("full", "gram"):
            raise ValueError(f"mode must be 'full' or 'gram', not {mode!r}")
        spec = method_json(method)
        named = self._groups(forget, retain, groups)
        a0 = next(iter(named.values())).arrays[0]
        if not is_torch(a0) and dtype == "bfloat16":
            raise ValueError("bfloat16 results need torch tensors as inputs; numpy has no bfloat16")
        if mode == "gram":
            if groups is None and "retain" not in named:
                raise ValueError("gram mode needs both forget and retain")
            return (yield from self._combine_gram(GramPlan.of(named, spec, layout, dtype), state))
        plan = yield Work(functools.partial(self._combine_of_arrays, named, spec, layout, dtype, state))
        reply = yield from self._send(plan.call)
        result: CombineResult = yield Work(functools.partial(self._combine_result, plan, reply))
        return result

    def _combine_gram(self, plan: GramPlan, state: str | None) -> Op[CombineResult]:
        t0 = time.perf_counter()
        k = yield Work(plan.gram)
        t1 = time.perf_counter()
        w = yield from self._weights(k, plan.method, plan.order, state)
        result: CombineResult = yield Work(
            functools.partial(plan.finish, k, w, (t0, t1, time.perf_counter()))
        )
        return result

    def _combine_safetensors(
        self,
        files: Mapping[str, bytes | bytearray | memoryview],
        method: MethodLike,
        *,
        layout: Layout,
        dtype: str | None,
        state: str | None,
    ) -> Op[FileResult]:
        method = check_args(method, layout, dtype)
        if not files:
            raise ValueError("no groups given")
        blobs: list[Blob] = []
        keys: list[str] = []
        order: list[str] | None = None
        for name, data in files.items():
            view = memoryview(data).cast("B")  # byte offsets, whatever the caller's view holds
            try:
                header = parse(view)
                if "order" in header.metadata:
                    order = order or [str(k) for k in json.loads(header.metadata["order"])]
            except (MalformedBody, ValueError, TypeError) as exc:
                raise ValueError(f"group {name!r}: not a valid safetensors file ({exc})") from None
            if not header.tensors:
                raise ValueError(f"group {name!r}: the file holds no tensors")
            blobs += [
                Blob(f"{name}/{t.name}", t.dtype, t.shape, view[t.begin : t.end]) for t in header.tensors
            ]
            keys = keys or [t.name for t in header.tensors]
        plan = self._combine_call(
            blobs,
            names=[str(n) for n in files],
            keys=keys,
            order=order,
            method=method_json(method),
            layout=layout,
            dtype=dtype,
            state=state,
            alloc=functools.partial(Buffer, torch_out=False),
        )
        reply = yield from self._send(plan.call)
        assert reply.file is not None
        meta = reply.file.meta
        return FileResult(
            data=reply.file.buffer.view,
            tensors={t.name: (DTYPES[t.dtype][1], t.shape) for t in self._views(plan, reply)},
            weights=_weights_of(meta.weights, plan, reply),
            method=meta.method,
            gram=meta.gram,
            device=meta.device,
            timing=meta.timing,
            state=meta.state,
            request_id=reply.request_id,
        )

    # ---- the JSON endpoints ----------------------------------------------------------------------------
    def _weights(
        self, gram: Any, method: MethodLike, groups: Sequence[str] | None, state: str | None
    ) -> Op[WeightsResult]:
        rows = gram.tolist() if hasattr(gram, "tolist") else gram
        payload: dict[str, Any] = {
            "method": method_json(method),
            "gram": [[float(x) for x in row] for row in rows],
        }
        if groups is not None:
            payload["groups"] = list(groups)
        if state is not None:
            payload["state"] = state
        call = Call(
            "POST",
            "/v1/weights",
            json_sink(JSON_REPLY_CAP + 4 * len(state or "")),
            headers={"Content-Type": JSON, "Accept": JSON},
            content=json.dumps(payload).encode(),
        )
        reply = yield from self._send(call)
        obj = reply.json()
        if not isinstance(obj, dict) or not isinstance(obj.get("method", {}), dict):
            raise MalformedReply(
                "weights reply is not an object with `method` and `weights`", request_id=reply.request_id
            )
        new_state = obj.get("state")
        if new_state is not None and not isinstance(new_state, str):
            new_state = json.dumps(new_state)
        return WeightsResult(
            method=obj.get("method") or {},
            weights=check_weights(obj.get("weights"), pair_or(groups), reply.request_id),
            state=new_state,
            request_id=reply.request_id,
        )

    def _methods(self) -> Op[list[MethodInfo]]:
        reply = yield from self._send(Call("GET", "/v1/methods", json_sink()))
        obj = reply.json()
        items = obj.get("methods", obj) if isinstance(obj, dict) else obj
        try:
            if not isinstance(items, list):
                raise ValueError("not a list")
            return [MethodInfo.model_validate(m) for m in items]
        except ValueError as exc:
            raise MalformedReply(f"methods reply: {str(exc)[:200]}", request_id=reply.request_id) from None

    def _info(self) -> Op[dict[str, Any]]:
        obj = (yield from self._send(Call("GET", "/v1/info", json_sink()))).json()
        return obj if isinstance(obj, dict) else {"info": obj}

    def _health(self) -> Op[Health]:
        live = yield from self._send(Call("GET", "/healthz", json_sink()))
        ready = yield from self._send(Call("GET", "/readyz", json_sink(), ok_status=(200, 503), retry=False))
        try:
            detail = json.loads(ready.content) if ready.content else {}
        except ValueError:
            detail = {}
        return Health(
            live=live.status == 200,
            ready=ready.status == 200,
            detail=detail if isinstance(detail, dict) else {},
        )
