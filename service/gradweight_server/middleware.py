"""Pure ASGI middleware: request id, one structured log line per request, request metrics, 500s."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from gradweight.errors import InternalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics
from .problems import PROBLEM_JSON, problem_bytes

log = logging.getLogger("gradweight_server.access")
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,128}\Z")


class RequestContext:
    """Outermost app middleware, so 500s rendered here still carry X-Request-ID and are logged once."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        ctx: dict[str, Any] = {"request_id": rid}
        scope["gw"] = ctx
        counts = {"in": 0, "out": 0, "status": 0}

        async def counting_receive() -> Message:
            msg = await receive()
            if msg["type"] == "http.request":
                counts["in"] += len(msg.get("body", b""))
            return msg

        async def tagging_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                counts["status"] = msg["status"]
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", rid.encode())]
            elif msg["type"] == "http.response.body":
                counts["out"] += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except Exception:
            log.exception("unhandled error in request %s", rid)
            if counts["status"] == 0:
                body = problem_bytes(InternalError("internal error; see the server log"), rid)
                await tagging_send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", PROBLEM_JSON.encode()),
                            (b"content-length", b"%d" % len(body)),
                        ],
                    }
                )
                await tagging_send({"type": "http.response.body", "body": body})
        finally:
            status = counts["status"] or 499
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_bytes.labels(path).observe(counts["in"])
            self.metrics.response_bytes.labels(path).observe(counts["out"])
            record = {
                "request_id": rid,
                "http_method": scope["method"],
                "path": scope["path"],
                "status": status,
                "bytes_in": counts["in"],
                "bytes_out": counts["out"],
                "ms": round((time.perf_counter() - started) * 1000, 3),
            }
            record.update({k: v for k, v in ctx.items() if k != "request_id"})
            log.info(json.dumps(record, separators=(",", ":")))
