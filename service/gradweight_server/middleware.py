"""Pure ASGI middleware: the request record, one structured log line, request metrics, 500s, and sending.

Sending is where a client that stops reading could hold memory for ever: the reply's buffer stays in the
transport while the reservation that counted it would already be released. So a large reply goes out in
pieces, each awaited until the transport has room again, within `send_timeout_s` plus its size at
`send_min_rate`; past that the connection is aborted, which frees the buffer. The record (with the
reservation and the leases) is closed only after the last piece. An answer given before the body was read
whole gets `Connection: close`, and the rest of the body is drained for a bounded time so the client can
still read the answer before the connection closes.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable

import anyio
from gradweight.errors import APIError, Forbidden, InternalError, MisdirectedRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .connection import ABORT
from .metrics import Metrics
from .problems import PROBLEM_JSON, problem_bytes, problem_response
from .record import RequestRecord
from .settings import Settings

log = logging.getLogger("gradweight_server.access")
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,128}\Z")
PIECE = 1 << 20
DRAIN_S = 2.0
DRAIN_BYTES = 64 << 20
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]


class _Aborted(Exception):
    pass


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def _has_body(scope: Scope) -> bool:
    for k, v in scope["headers"]:
        if (k == b"content-length" and v.strip() not in (b"0", b"")) or k == b"transfer-encoding":
            return True
    return False


class RequestContext:
    """Outermost app middleware, so 500s rendered here still carry X-Request-ID and are logged once."""

    def __init__(self, app: ASGIApp, metrics: Metrics, settings: Settings) -> None:
        self.app = app
        self.metrics = metrics
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        record = RequestRecord(given if _VALID_ID.match(given) else uuid.uuid4().hex)
        scope.setdefault("state", {})["record"] = record
        sender = _Sender(self.settings, scope, receive, send, record)
        app = self.app
        refused = self._refusal(scope)
        if refused is not None:
            record.error = refused.code
            app = problem_response(refused, record.request_id)
        try:
            await app(scope, sender.receive, sender.send)
        except _Aborted:
            pass
        except Exception:
            log.exception("unhandled error in request %s", record.request_id)
            if record.status == 0:
                await sender.send_500()
        finally:
            record.close()
            self._observe(scope, record)

    def _refusal(self, scope: Scope) -> APIError | None:
        """421 for a Host not in `allowed_hosts`, 403 for an Origin not in `allowed_origins`."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").rsplit(":", 1)[0].lower()
        if not any(_host_matches(host, pattern) for pattern in self.settings.allowed_hosts):
            return MisdirectedRequest(f"this server does not serve host {host[:100]!r}")
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") not in self.settings.allowed_origins:
            return Forbidden("requests from this origin are not served (setting allowed_origins)")
        return None

    def _observe(self, scope: Scope, record: RequestRecord) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "other"
        self.metrics.requests.labels(path, str(record.status or 499)).inc()
        self.metrics.request_bytes.labels(path).observe(record.bytes_in)
        self.metrics.response_bytes.labels(path).observe(record.bytes_out)
        if record.method is not None:
            for stage, seconds in record.stages.items():
                self.metrics.stage_seconds.labels(stage, record.method).observe(seconds)
        log.info(json.dumps(record.log_line(scope["method"], scope["path"][:200]), separators=(",", ":")))


class _Sender:
    """The receive/send pair the app sees: counts bytes, tags replies, paces big bodies, drains early ones."""

    def __init__(self, settings: Settings, scope: Scope, receive: Receive, send: Send, record: RequestRecord):
        self.settings = settings
        self.record = record
        self._receive = receive
        self._send = send
        self.expects_body = _has_body(scope)
        self.early = False
        self.aborted = False
        abort: Callable[[], None] | None = scope.get("extensions", {}).get(ABORT)
        self.abort = abort
        if not self.expects_body:
            record.body_done = True

    async def receive(self) -> Message:
        msg = await self._receive()
        if msg["type"] == "http.request":
            self.record.bytes_in += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                self.record.body_done = True
        elif msg["type"] == "http.disconnect":
            self.record.body_done = True
        return msg

    async def send(self, msg: Message) -> None:
        if self.aborted:
            return
        if msg["type"] == "http.response.start":
            self.record.status = msg["status"]
            headers = [*msg.get("headers", []), (b"x-request-id", self.record.request_id.encode())]
            headers += SECURITY_HEADERS
            if not self.record.body_done:
                self.early = True
                headers.append((b"connection", b"close"))
            await self._send({**msg, "headers": headers})
            return
        if msg["type"] != "http.response.body":
            await self._send(msg)
            return
        body = msg.get("body", b"")
        more = msg.get("more_body", False)
        self.record.bytes_out += len(body)
        if len(body) > PIECE:
            await self._paced(memoryview(body), more or self.early)
        elif body or more or not self.early:
            await self._send({"type": "http.response.body", "body": body, "more_body": more or self.early})
        if not more and self.early:
            self.record.close()  # the answer is written: nothing the drain reads is kept
            await self._drain()
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _paced(self, body: memoryview, more: bool) -> None:
        limit = self.settings.send_timeout_s + len(body) / self.settings.send_min_rate
        with anyio.move_on_after(limit) as scope:
            for i in range(0, len(body), PIECE):
                last = i + PIECE >= len(body)
                await self._send(
                    {"type": "http.response.body", "body": body[i : i + PIECE], "more_body": more or not last}
                )
        if scope.cancelled_caught:
            self.record.error = "send-timeout"
            self.aborted = True
            if self.abort is not None:
                self.abort()
            await anyio.sleep(0)  # let the transport report the lost connection first
            raise _Aborted

    async def _drain(self) -> None:
        """Read and drop up to DRAIN_BYTES of the unread body for up to DRAIN_S, so the answer is read."""
        drained = 0
        with anyio.move_on_after(DRAIN_S):
            while not self.record.body_done and drained < DRAIN_BYTES:
                msg = await self.receive()
                drained += len(msg.get("body", b""))

    async def send_500(self) -> None:
        body = problem_bytes(InternalError("internal error; see the server log"), self.record.request_id)
        headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", b"%d" % len(body))]
        await self.send({"type": "http.response.start", "status": 500, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
