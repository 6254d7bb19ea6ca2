"""Request dependencies: bearer auth, readiness, and admission before a body byte is read."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, Request
from gradweight.errors import (
    MalformedBody,
    NotReady,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)

from .admission import BodyKind, Ticket
from .runtime import Runtime
from .settings import Settings


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


def require_token(request: Request) -> None:
    """Constant-time comparison so the token cannot be guessed byte by byte from response times."""
    token = get_settings(request).token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        raise Unauthorized("this server needs `Authorization: Bearer <token>`")


def require_ready(request: Request) -> None:
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


async def admit_body(
    request: Request, _auth: None = Depends(require_token), _ready: None = Depends(require_ready)
) -> AsyncIterator[Ticket]:
    """Refuse by Content-Type, size and load before reading the body; release the bytes afterwards."""
    runtime = get_runtime(request)
    settings = runtime.settings
    mt = media_type(request)
    try:
        kind = BodyKind(mt)
    except ValueError:
        raise UnsupportedMediaType(
            f"Content-Type {mt or '(none)'!r}: use application/octet-stream, multipart/form-data "
            "or application/json"
        ) from None
    if request.url.path.endswith("/weights") and kind is not BodyKind.JSON:
        raise UnsupportedMediaType("POST /v1/weights takes application/json")
    limit = settings.max_json_body_bytes if kind is BodyKind.JSON else settings.max_body_bytes
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    ticket = runtime.admission.admit(declared or 0)
    ticket.declared, ticket.limit, ticket.kind = declared, limit, kind
    ticket.content_type = request.headers.get("content-type", "")
    try:
        yield ticket
    finally:
        ticket.release()
