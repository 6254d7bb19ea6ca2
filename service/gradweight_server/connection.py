"""The HTTP/1.1 connection, guarded before the app sees a request: header limits, timeouts, a connection cap.

uvicorn's httptools protocol has no limit on the header block (one 128 MiB header took 16 s of event-loop CPU,
growing with the square of its size) or on the number of headers, and no timeout before the first request or
while the header block trickles in. `GuardedProtocol` adds them where the bytes arrive, so the cost is one
counter per read and the event loop never parses more than `max_http_header_bytes` of a header block:
- a header block over `max_http_header_bytes` or with more than `max_http_headers` headers gets 431;
- a connection that has not sent a whole header block `header_timeout_s` after it opened (or after its last
  reply) is closed, with 408 when it had started one;
- past `max_connections` the oldest idle connection is closed to make room, so `/healthz` still answers;
- the app gets `abort` in the scope's extensions to drop a connection whose client stopped reading, and
  `body_sink` to receive an admitted body straight into its buffer (body_sink.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import httptools
from gradweight.errors import APIError, HeadersTooLarge, Overloaded, RequestTimeout
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .body_sink import BodySink
from .settings import Settings

ABORT = "gradweight.abort"
SINK = "gradweight.body_sink"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _TooManyHeaders(Exception):
    pass


def _raw_problem(err: APIError) -> bytes:
    body = json.dumps(err.problem()).encode()
    head = (
        f"HTTP/1.1 {err.status} {err.title}\r\ncontent-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _HeadWithBody:
    """A request cycle's transport that holds the response head back and sends it with the first body
    bytes in one write: uvicorn writes them apart, and each loopback send woke the client (at 2 cores,
    under load, the head's send was most of a small request's server time). A head with no body write
    after it in the same loop iteration goes out alone at the iteration's end."""

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._flush: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        cycle = self._cycle
        if self._flush is None and cycle.response_started and not cycle.response_complete:
            self._head = bytes(data)  # the first write once the response started: its head
            self._flush = asyncio.get_running_loop().call_soon(self._write_head)
            return
        head, self._head = self._head, None
        if head is None:
            self._transport.write(data)
        elif len(data) <= len(head) * 16:
            self._transport.write(head + data)
        else:
            self._transport.writelines([head, data])

    def _write_head(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self._write_head()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards above; `protocol_for(settings)` binds the limits."""

    settings: Settings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.opened = time.monotonic()
        self.in_head = True
        self.head_bytes = 0
        self.n_headers = 0
        room = self._make_room()
        super().connection_made(transport)
        self.head_timer: asyncio.TimerHandle | None = None
        if not room:
            cap = self.settings.max_connections
            self._refuse(
                Overloaded(f"{cap} connections already busy", retry_after=self.settings.retry_after_s)
            )
            return
        self._arm_head_timer()

    def _make_room(self) -> bool:
        """Close the oldest idle connections while the cap is reached; False when all are busy."""
        cap = self.settings.max_connections
        if len(self.connections) < cap:
            return True
        idle = sorted(
            (c for c in self.connections if isinstance(c, GuardedProtocol) and c.idle()),
            key=lambda c: c.opened,
        )
        for conn in idle[: len(self.connections) - cap + 1]:
            conn.transport.close()
            self.connections.discard(conn)
        return len(self.connections) < cap

    def idle(self) -> bool:
        """No request being served: between requests, or still sending a header block."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.settings.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "head_timer", None) is not None:
            assert self.head_timer is not None
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timeout(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.idle():
            return
        if self.head_bytes:
            limit = self.settings.header_timeout_s
            self._refuse(RequestTimeout(f"the request head did not arrive whole within {limit:g} s"))
        else:
            self.transport.close()

    def _refuse(self, err: APIError) -> None:
        if not self.transport.is_closing():
            self.transport.write(_raw_problem(err))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if not self.in_head:
            self._feed(data)
            return
        room = self.settings.max_http_header_bytes - self.head_bytes
        self.head_bytes += len(data)
        if len(data) <= room:
            self._feed(data)
            return
        self._feed(data[:room])  # the head may end inside this read: only the bytes past the cap are refused
        if self.in_head:
            self._refuse(HeadersTooLarge(f"header block over {self.settings.max_http_header_bytes} bytes"))
        elif not self.transport.is_closing():
            self._feed(data[room:])

    def _feed(self, data: bytes) -> None:
        """uvicorn's `data_received`, except that a connection refused by a guard gets no second answer."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if not self.transport.is_closing():
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        self.n_headers = 0
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self.in_head = True
        super().on_message_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.n_headers += 1
        if self.n_headers > self.settings.max_http_headers:
            self._refuse(HeadersTooLarge(f"more than {self.settings.max_http_headers} headers"))
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        self._cancel_head_timer()
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[ABORT] = self.transport.abort
        super().on_headers_complete()
        cycle = self.cycle
        cycle.transport = cast(asyncio.Transport, _HeadWithBody(self.transport, cycle))
        extensions[SINK] = lambda view, end: self._lend(cycle, view, end)

    def _lend(self, cycle: Any, view: memoryview, end: int) -> BodySink | None:
        """Lend the transport to a BodySink for the rest of `cycle`'s body (`end` bytes in all), after
        moving what uvicorn already buffered into `view`; None when the body is already whole (it is
        then read as usual) or the request is not the one being read."""
        if cycle is not self.cycle or not cycle.more_body or self.pipeline or self.transport.is_closing():
            return None
        if cycle.waiting_for_100_continue:
            self.transport.write(CONTINUE)
            cycle.waiting_for_100_continue = False
        held = len(cycle.body)
        if held >= end:
            return None
        view[:held] = cycle.body
        cycle.body = bytearray()
        self.flow.resume_reading()
        return BodySink(self, view, held, end)

    def body_complete(self) -> None:
        """The sink read the body's last byte: the parser, which never saw those bytes, starts afresh."""
        self.parser = httptools.HttpRequestParser(self)
        self.in_head = True
        if self.cycle is not None:
            self.cycle.more_body = False
            self.cycle.message_event.set()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.idle():
            self._arm_head_timer()


def protocol_for(settings: Settings) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {"settings": settings})
