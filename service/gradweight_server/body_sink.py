"""A request body received straight into its leased buffer, past uvicorn's parser.

Through ASGI a body byte is copied four times in user space before it reaches our buffer (the socket read
into bytes, httptools' callback into bytes, uvicorn's bytearray, uvicorn's message bytes), and the read
pauses every 64 KiB until the app asks for more: at 10M parameters per group that was 30 ms of an 80 MB
request. Once a body of declared length is admitted, its connection's transport is lent to a `BodySink`,
an asyncio BufferedProtocol, for the rest of the body: the kernel writes the bytes into the buffer, with no
pause and no event-loop round trip per read. At the body's last byte the HTTP protocol gets its transport
back with a fresh parser (the old one still expects the bytes it never saw), and the request's message
reads as complete. A body given up half way (a timeout) is still read to its end into scratch, so the
connection's framing stays exact for the answer and for the drain that follows it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

SCRATCH = 1 << 16


class HttpSide(Protocol):
    """What the sink needs of the HTTP protocol it stands in for (connection.GuardedProtocol)."""

    transport: asyncio.Transport

    def body_complete(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def eof_received(self) -> bool | None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class BodySink(asyncio.BufferedProtocol):
    """The transport's protocol while bytes [pos, end) of a body arrive into `view`; `done` is set when
    the body is whole (`received`) or the client is gone (`gone`)."""

    def __init__(self, http: HttpSide, view: memoryview, pos: int, end: int) -> None:
        self.http = http
        self.view: memoryview | None = view
        self.pos = pos
        self.end = end
        self.done = asyncio.Event()
        self.received = False
        self.gone = False
        self.last = time.monotonic()
        self._scratch = memoryview(b"")
        http.transport.set_protocol(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.view is not None:
            return self.view[self.pos : self.end]
        return self._scratch[: self.end - self.pos]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        self.last = time.monotonic()
        if self.pos >= self.end:
            self.received = self.view is not None
            self._release()
            self.http.transport.set_protocol(self.http)  # type: ignore[arg-type]
            self.http.body_complete()
            self.done.set()

    def abandon(self) -> None:
        """Stop writing into the buffer (it is about to be returned); read the rest of the body into
        scratch and drop it."""
        if not self.done.is_set() and self.view is not None:
            self._release()
            self._scratch = memoryview(bytearray(SCRATCH))

    def _release(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._release()
        self.done.set()
        self.http.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.http.eof_received()

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()
