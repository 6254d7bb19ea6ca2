"""Stream the request body into one buffer: preallocated from Content-Length, grown only when chunked."""

from __future__ import annotations

import anyio
from fastapi import Request
from gradweight.errors import MalformedBody, PayloadTooLarge

from .admission import Ticket
from .pool import BufferPool


class ClientGone(Exception):
    """The client disconnected before its body arrived whole; there is no one left to answer."""


class _Watchdog:
    """Cancels the read unless every `window` seconds bring at least `min_bytes` (or the body ends).

    An idle timeout alone is re-armed by every byte, so a client trickling one byte a second would hold its
    slot and its Content-Length-sized buffer for ever; requiring a minimum rate per window closes that.
    """

    def __init__(self, scope: anyio.CancelScope, window: float, min_rate: int) -> None:
        self.scope = scope
        self.window = window
        self.min_bytes = max(1, int(min_rate * window))
        self.pending = 0
        scope.deadline = anyio.current_time() + window

    def fed(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.min_bytes:
            self.pending = 0
            self.scope.deadline = anyio.current_time() + self.window


async def read_body(
    request: Request,
    ticket: Ticket,
    pool: BufferPool | None = None,
    idle_timeout: float = 60.0,
    min_rate: int = 1,
) -> bytearray:
    """The whole body; a client slower than `min_rate` bytes/s over any `idle_timeout` window gets 400."""
    with anyio.CancelScope() as scope:
        return await _read(request, ticket, pool, _Watchdog(scope, idle_timeout, min_rate))
    raise MalformedBody(
        f"the body arrived slower than {min_rate} bytes/s over {idle_timeout:g} s; the request was dropped"
    )


async def _read(request: Request, ticket: Ticket, pool: BufferPool | None, watchdog: _Watchdog) -> bytearray:
    """The whole body in one bytearray, read straight from the ASGI channel (no Starlette copies).

    With Content-Length the buffer is allocated once at full size; a chunked body grows one buffer and is
    accounted against the in-flight bytes and refused with 413 as soon as it passes the limit.
    """
    receive = request.receive
    declared = ticket.declared
    if declared is not None:
        buf = pool.take(declared) if pool is not None else bytearray(declared)
        view = memoryview(buf)
        pos = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone
            chunk = msg.get("body", b"")
            watchdog.fed(len(chunk))
            end = pos + len(chunk)
            if end > declared:
                raise MalformedBody(f"body longer than its Content-Length of {declared} bytes")
            view[pos:end] = chunk
            pos = end
            if not msg.get("more_body", False):
                break
        view.release()
        if pos != declared:
            raise MalformedBody(f"body has {pos} bytes but Content-Length said {declared}")
        return buf
    buf = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        watchdog.fed(len(chunk))
        if len(buf) + len(chunk) > ticket.limit:
            raise PayloadTooLarge(f"chunked body passed the limit of {ticket.limit} bytes")
        ticket.grow(len(chunk))
        buf += chunk
        if not msg.get("more_body", False):
            return buf
