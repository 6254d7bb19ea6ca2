"""Every error leaves as application/problem+json with a PROTOCOL.md code; never a stack trace."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from gradweight.errors import APIError, InvalidMethod, MalformedBody
from starlette.exceptions import HTTPException as StarletteHTTPException

from .body import ClientGone
from .record import RequestRecord

log = logging.getLogger("gradweight_server")
PROBLEM_JSON = "application/problem+json"
MAX_DETAIL = 500
MAX_PATH = 200


def _body(err: APIError, request_id: str | None) -> dict[str, Any]:
    """The problem document; details quoting client input are cut short so a reply never echoes it whole."""
    body = err.problem()
    detail = str(body.get("detail", ""))
    if len(detail) > MAX_DETAIL:
        body["detail"] = detail[:MAX_DETAIL] + "..."
    if request_id:
        body["request_id"] = request_id
    return body


def problem_response(err: APIError, request_id: str | None = None) -> Response:
    body = _body(err, request_id)
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(int(err.retry_after))
    return Response(json.dumps(body), status_code=err.status, media_type=PROBLEM_JSON, headers=headers)


def problem_bytes(err: APIError, request_id: str | None = None) -> bytes:
    return json.dumps(_body(err, request_id)).encode()


def _record(request: Request) -> RequestRecord | None:
    record = request.scope.get("state", {}).get("record")
    return record if isinstance(record, RequestRecord) else None


def install(app: FastAPI) -> None:
    """Register the handlers; anything unhandled is caught by the request middleware as 500 internal."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        record = _record(request)
        if record is not None:
            record.error = exc.code
        return problem_response(exc, record.request_id if record is not None else None)

    async def client_gone(request: Request, exc: Exception) -> Response:
        record = _record(request)
        if record is not None:
            record.error = "client-disconnected"
        return Response(status_code=499)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else "request"
        msg = errors[0]["msg"] if errors else "invalid request"
        in_query = bool(errors) and errors[0]["loc"][0] == "query"
        err: APIError = InvalidMethod(f"{where}: {msg}") if in_query else MalformedBody(f"{where}: {msg}")
        return await api_error(request, err)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "internal")
        body = {
            "type": f"https://gradweight.dev/problems/{code}",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": f"{request.method} {request.url.path[:MAX_PATH]}: {exc.detail}",
            "code": code,
        }
        return Response(
            json.dumps(body), status_code=exc.status_code, media_type=PROBLEM_JSON, headers=exc.headers
        )

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
