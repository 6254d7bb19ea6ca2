"""`Client` and `AsyncClient`: the same calls, blocking and async, over one httpx connection pool.

Each call is written once in the sans-I/O core (core.py) as a generator of steps; a twin is the loop
that performs them (`_run`, `_step`, `_exchange`) plus one line per public method. A combine reply is
read into one buffer of the size the request implies, checked, and the returned tensors view it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from .core import (
    DEFAULT_TIMEOUT,
    OCTET,
    BaseClient,
    Exchange,
    MethodLike,
    Op,
    Sleep,
    Step,
    Steps,
    T,
    __version__,
    method_json,
)
from .errors import TransportError
from .retry import Retry
from .sink import Reply
from .tensors import Gradients
from .types import CombineResult, FileResult, Health, Layout, MethodInfo, Mode, WeightsResult

__all__ = ["DEFAULT_TIMEOUT", "OCTET", "AsyncClient", "Client", "MethodLike", "__version__", "method_json"]

# Indirections so tests can record backoff instead of sleeping.
_sleep = time.sleep
_asleep = asyncio.sleep
# httpcore writes a request's headers and its body in separate sends: with Nagle's algorithm the body
# of a small request (gram mode's /v1/weights) can wait for the ACK of the headers, which the server
# may delay by tens of milliseconds.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _wrap(exc: httpx.HTTPError) -> TransportError:
    err = TransportError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    err.__cause__ = exc
    return err


class Client(BaseClient):
    """Blocking client: `Client(url, token=, timeout=, retries=, progress=)`; use it as a context manager.

    `timeout` bounds each try (seconds, or an httpx.Timeout); `retries` is a `Retry` policy (default: retry
    connection failures and 503s for up to 60 s in all) or a number of retries."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | Retry | None = None,
        progress: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token=token, timeout=timeout, retries=retries, progress=progress)
        transport = transport or httpx.HTTPTransport(socket_options=NODELAY)
        self._http = httpx.Client(timeout=self._timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- the I/O loop ----------------------------------------------------------------------------------
    def _run(self, op: Op[T]) -> T:
        steps = Steps(op)
        for step in steps:
            try:
                steps.outcome = self._step(step)
            except Exception as exc:
                steps.outcome = exc
        result: T = steps.result
        return result

    def _step(self, step: Step) -> Any:
        if isinstance(step, Exchange):
            return self._exchange(step)
        if isinstance(step, Sleep):
            return _sleep(step.seconds)
        return step.fn()

    def _exchange(self, ex: Exchange) -> Reply:
        try:
            response = self._http.send(ex.request, stream=True)
            try:
                with ex.open(response.status_code, response.headers) as sink:
                    for chunk in response.iter_bytes():
                        if not sink.feed(chunk):
                            break
                    return sink.finish()
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise _wrap(exc) from exc

    # ---- API -------------------------------------------------------------------------------------------
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
        key -> tensor, or numpy arrays; pass the previous result's `.state` for stateful methods. The
        reply is checked against the request (count, dtype, shapes, group names, finiteness):
        `MalformedReply` when it does not match.
        """
        op = self._combine(
            forget, retain, method, groups=groups, layout=layout, dtype=dtype, mode=mode, state=state
        )
        return self._run(op)

    def combine_safetensors(
        self,
        files: Mapping[str, bytes | bytearray | memoryview],
        method: MethodLike,
        *,
        layout: Layout = "flat",
        dtype: str | None = None,
        state: str | None = None,
    ) -> FileResult:
        """Combine groups given as safetensors files (group name -> the file's bytes, e.g. an mmap): sent
        as they are, answered as the checked reply file (`FileResult.data`). No torch needed, any dtype."""
        return self._run(self._combine_safetensors(files, method, layout=layout, dtype=dtype, state=state))

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
        return self._run(self._weights(gram, method, groups, state))

    def methods(self) -> list[MethodInfo]:
        """Every method the server offers (GET /v1/methods)."""
        return self._run(self._methods())

    def info(self) -> dict[str, Any]:
        """Version, device and limits of the server (GET /v1/info)."""
        return self._run(self._info())

    def health(self) -> Health:
        """Liveness and readiness; a not-ready server is an answer here, not an error."""
        return self._run(self._health())


class AsyncClient(BaseClient):
    """The async twin of `Client`: same constructor, same methods, awaited; heavy local work (host copies,
    gram, checks) runs in a worker thread so the event loop stays free."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | Retry | None = None,
        progress: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token=token, timeout=timeout, retries=retries, progress=progress)
        transport = transport or httpx.AsyncHTTPTransport(socket_options=NODELAY)
        self._http = httpx.AsyncClient(timeout=self._timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ---- the I/O loop ----------------------------------------------------------------------------------
    async def _run(self, op: Op[T]) -> T:
        steps = Steps(op)
        for step in steps:
            try:
                steps.outcome = await self._step(step)
            except Exception as exc:
                steps.outcome = exc
        result: T = steps.result
        return result

    async def _step(self, step: Step) -> Any:
        if isinstance(step, Exchange):
            return await self._exchange(step)
        if isinstance(step, Sleep):
            return await _asleep(step.seconds)
        return await asyncio.to_thread(step.fn)

    async def _exchange(self, ex: Exchange) -> Reply:
        try:
            response = await self._http.send(ex.request, stream=True)
            try:
                with ex.open(response.status_code, response.headers) as sink:
                    async for chunk in response.aiter_bytes():
                        if not sink.feed(chunk):
                            break
                    return sink.finish()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise _wrap(exc) from exc

    # ---- API -------------------------------------------------------------------------------------------
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
        """See `Client.combine`."""
        op = self._combine(
            forget, retain, method, groups=groups, layout=layout, dtype=dtype, mode=mode, state=state
        )
        return await self._run(op)

    async def combine_safetensors(
        self,
        files: Mapping[str, bytes | bytearray | memoryview],
        method: MethodLike,
        *,
        layout: Layout = "flat",
        dtype: str | None = None,
        state: str | None = None,
    ) -> FileResult:
        """See `Client.combine_safetensors`."""
        return await self._run(
            self._combine_safetensors(files, method, layout=layout, dtype=dtype, state=state)
        )

    async def weights(
        self,
        gram: Any,
        method: MethodLike,
        *,
        groups: Sequence[str] | None = None,
        state: str | None = None,
    ) -> WeightsResult:
        """See `Client.weights`."""
        return await self._run(self._weights(gram, method, groups, state))

    async def methods(self) -> list[MethodInfo]:
        """See `Client.methods`."""
        return await self._run(self._methods())

    async def info(self) -> dict[str, Any]:
        """See `Client.info`."""
        return await self._run(self._info())

    async def health(self) -> Health:
        """See `Client.health`."""
        return await self._run(self._health())
