"""Request dependencies: bearer auth, readiness, admission before a body byte is read, and the read body.

Routes receive typed objects: `Body` (the admitted body, read whole into a leased buffer, with its
`BodyInfo`) and the `RequestRecord`. Admission and body reading are parameterised once per route
(`read_body_of(kinds)`), so no route repeats them and no dependency knows route paths.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from gradweight.errors import (
    MalformedBody,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)

from .body import BodyInfo, BodyKind, read_body
from .connection import SINK
from .pool import Buffer, Lease
from .record import RequestRecord
from .runtime import Runtime
from .settings import Settings


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


async def get_record(request: Request) -> RequestRecord:
    return record_of(request)


def record_of(request: Request) -> RequestRecord:
    record: RequestRecord = request.state.record
    return record


async def require_token(request: Request) -> None:
    """Constant-time comparison so the token cannot be guessed byte by byte from response times.

    The dependencies are coroutines: FastAPI runs a plain function dependency in a worker thread, a
    thread hop per dependency and request (most of a small request's fixed cost)."""
    token = get_settings(request).token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        raise Unauthorized("this server needs `Authorization: Bearer <token>`")


async def require_ready(request: Request) -> None:
    check_ready(request)


def check_ready(request: Request) -> None:
    if not get_runtime(request).ready:
        raise NotReady("the device is still warming up", retry_after=get_settings(request).retry_after_s)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _declared_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise MalformedBody("Content-Length is not a non-negative integer")
    return n


def body_info(request: Request, kinds: frozenset[BodyKind]) -> BodyInfo:
    """The body as the headers describe it; 415 or 413 before any of it is read."""
    mt = media_type(request)
    try:
        kind = BodyKind(mt)
    except ValueError:
        kind = None
    if kind not in kinds:
        accepted = ", ".join(k.value for k in BodyKind if k in kinds)
        raise UnsupportedMediaType(f"Content-Type {mt or '(none)'!r}: {request.url.path} takes {accepted}")
    settings = get_settings(request)
    limit = settings.max_json_body_bytes if kind is BodyKind.JSON else settings.max_body_bytes
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    return BodyInfo(kind, request.headers.get("content-type", ""), declared, limit)


@dataclass
class Body:
    """An admitted request body, read whole; `lease` holds its buffer until the route closes it."""

    info: BodyInfo
    lease: Lease

    @property
    def buffer(self) -> Buffer:
        return self.lease.buffer


def read_body_of(kinds: frozenset[BodyKind]) -> Callable[..., Coroutine[Any, Any, Body]]:
    """A dependency: auth, readiness, media type and size, admission, then the body read whole."""

    async def dependency(
        request: Request, _auth: None = Depends(require_token), _ready: None = Depends(require_ready)
    ) -> Body:
        runtime = get_runtime(request)
        settings = runtime.settings
        record = record_of(request)
        info = body_info(request, kinds)
        record.reservation = runtime.admission.admit(info.estimate(info.declared or 0))
        with record.stage("receive"):
            lease = await read_body(
                request.receive,
                info,
                record.reservation,
                runtime.pool,
                timeout_s=settings.body_timeout_s,
                min_rate=settings.body_min_rate,
                lend=request.scope.get("extensions", {}).get(SINK),
            )
        record.bytes_in = max(record.bytes_in, len(lease.buffer))  # a lent body bypasses the messages
        record.body_done = True
        return Body(info, record.hold(lease))

    return dependency
