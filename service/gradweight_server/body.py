"""The request body: what the headers say about it (`BodyInfo`), and reading it into one leased buffer.

Memory is committed as the bytes arrive, never from Content-Length alone (two clients declaring 1 GiB
raised RSS by 1.8 GiB before sending a byte): the buffer grows with the data, unless the pool holds one of
exactly the declared size from an earlier request, which is reused as is. A body must arrive within
`body_timeout_s` plus its size at `body_min_rate`, and may not pause longer than `body_timeout_s`.
A large body of declared length is received straight into the buffer where the server allows it
(`lend`, body_sink.py), else through the ASGI messages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import anyio
from gradweight.errors import MalformedBody, PayloadTooLarge
from starlette.types import Receive

from .admission import Reservation
from .body_sink import BodySink
from .pool import Buffer, BufferPool, Lease, fresh

Lend = Callable[[memoryview, int], BodySink | None]

# Bytes of host memory a body byte may cost: the body, plus the reply (a combine's result is at most half a
# pair's body, in the input dtype) for binary bodies, or the Python objects JSON text parses into (`[[],..]`
# expands about 26 times) for JSON ones. Set to the exact figure once the body is decoded.
HELD_PER_BODY_BYTE = 1.5
HELD_PER_JSON_BYTE = 32.0
SMALL_BODY = 1 << 20
SMALL_TEXT = 64 * 1024
LEND_FROM = 256 * 1024  # below this the ASGI path costs less than lending the transport


class ClientGone(Exception):
    """The client disconnected before its body arrived whole; there is no one left to answer."""


class BodyKind(str, Enum):
    SAFETENSORS = "application/octet-stream"
    MULTIPART = "multipart/form-data"
    JSON = "application/json"


@dataclass(frozen=True, slots=True)
class BodyInfo:
    """What the request headers say about the body; `declared` is None for a chunked body."""

    kind: BodyKind
    content_type: str
    declared: int | None
    limit: int

    def estimate(self, nbytes: int) -> int:
        """What `nbytes` of this body may cost; JSON text up to SMALL_TEXT parses into a few MiB at most."""
        if self.kind is BodyKind.JSON:
            return nbytes + math.ceil(max(0, nbytes - SMALL_TEXT) * (HELD_PER_JSON_BYTE - 1))
        return math.ceil(nbytes * HELD_PER_BODY_BYTE)


async def read_body(
    receive: Receive,
    info: BodyInfo,
    reservation: Reservation,
    pool: BufferPool,
    *,
    timeout_s: float,
    min_rate: int,
    lend: Lend | None = None,
) -> Lease:
    """The whole body in one leased buffer, read straight from the ASGI channel (no Starlette copies),
    or from the socket by a BodySink when `lend` gives one."""
    lease = pool.reuse(info.declared) if info.declared and info.kind is not BodyKind.JSON else None
    buf = lease.buffer if lease is not None else _fresh(info)
    try:
        lendable = info.kind is not BodyKind.JSON and (info.declared or 0) >= LEND_FROM
        sink = lend(memoryview(buf), len(buf)) if lend is not None and lendable else None
        if sink is not None:
            if not await _sunk(sink, timeout_s, len(buf) / min_rate):
                raise _late(timeout_s, min_rate)
        else:
            with anyio.CancelScope() as scope:
                await _read(receive, info, reservation, buf, scope, timeout_s, min_rate)
            if scope.cancelled_caught:
                raise _late(timeout_s, min_rate)
        return lease if lease is not None else pool.adopt(buf)
    except BaseException:
        if lease is not None:
            lease.close()
        raise


def _late(timeout_s: float, min_rate: int) -> MalformedBody:
    return MalformedBody(
        f"the body did not arrive in time: it may pause at most {timeout_s:g} s and must come "
        f"at {min_rate} bytes/s or faster; the request was dropped"
    )


async def _sunk(sink: BodySink, timeout_s: float, transfer_s: float) -> bool:
    """Wait for the sink: True once the body is whole; False past the deadlines (no byte for
    `timeout_s`, or not whole `timeout_s + transfer_s` after the start). Wakes only at those deadlines,
    not per read. ClientGone when the connection drops."""
    overall = time.monotonic() + timeout_s + transfer_s
    try:
        while not sink.done.is_set():
            limit = min(sink.last + timeout_s, overall)
            wait = limit - time.monotonic()
            if wait <= 0:
                return False
            with anyio.move_on_after(wait):
                await sink.done.wait()
    finally:
        if not sink.done.is_set():
            sink.abandon()
    if not sink.received:
        raise ClientGone
    return True


async def _read(
    receive: Receive,
    info: BodyInfo,
    reservation: Reservation,
    buf: Buffer,
    scope: anyio.CancelScope,
    timeout_s: float,
    min_rate: int,
) -> None:
    """The body's ASGI messages into `buf` (a bytearray grown as they come when the length is unknown)."""
    start = anyio.current_time()
    scope.deadline = start + timeout_s
    declared = info.declared
    view = memoryview(buf) if len(buf) else None
    pos = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        end = pos + len(chunk)
        if declared is not None and end > declared:
            raise MalformedBody(f"body longer than its Content-Length of {declared} bytes")
        if end > info.limit:
            raise PayloadTooLarge(f"chunked body passed the limit of {info.limit} bytes")
        if declared is None:
            reservation.grow(info.estimate(end) - info.estimate(pos))
        if view is not None:
            view[pos:end] = chunk
        else:
            assert isinstance(buf, bytearray)
            buf += chunk
        pos = end
        if not msg.get("more_body", False):
            break
        now = anyio.current_time()
        scope.deadline = min(now + timeout_s, start + timeout_s + max(pos, declared or 0) / min_rate)
    if view is not None:
        view.release()
    if declared is not None and pos != declared:
        raise MalformedBody(f"body has {pos} bytes but Content-Length said {declared}")


def _fresh(info: BodyInfo) -> Buffer:
    """A buffer for a body not in the pool: an mmap of the declared size (pages committed as bytes land),
    a small bytearray, or an empty one that grows (chunked bodies, and JSON, which json.loads needs whole)."""
    if info.declared is None or info.kind is BodyKind.JSON:
        return bytearray()
    if info.declared <= SMALL_BODY:
        return bytearray(info.declared)
    return fresh(info.declared)
