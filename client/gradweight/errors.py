"""One exception hierarchy, shared by the client and the server.

Every PROTOCOL.md error code is a class here carrying its HTTP status and slug. The server raises these
and renders them as problem+json; the client rebuilds the same class from a problem+json reply, so a
trainer catches `gradweight.Degenerate` whichever side detected it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GradweightError(Exception):
    """Base class of every error this package raises."""


class TransportError(GradweightError):
    """The request never got an answer: connection refused or reset, timeout, protocol error."""


class MalformedReply(GradweightError):
    """The server's answer breaks the protocol or does not match the request: wrong element count, dtype,
    shape or group names, a NaN or infinity, a body longer than the request implies, not JSON. A broken
    proxy or a bad deploy; never retried, since the same request would get the same answer."""

    def __init__(self, detail: str, *, request_id: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.request_id = request_id

    def __str__(self) -> str:
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"malformed reply: {self.detail}{rid}"


class APIError(GradweightError):
    """A problem+json answer (RFC 9457), or the same condition detected in-process."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        detail: str = "",
        *,
        request_id: str | None = None,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.request_id = request_id
        self.retry_after = retry_after
        self.extra = extra or {}

    def __str__(self) -> str:
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"{self.status} {self.code}: {self.detail}{rid}"

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 body for this error."""
        return {
            "type": f"https://gradweight.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }


class MalformedBody(APIError):
    status, code, title = 400, "malformed-body", "Malformed request body"


class Unauthorized(APIError):
    status, code, title = 401, "unauthorized", "Missing or wrong bearer token"


class PayloadTooLarge(APIError):
    status, code, title = 413, "payload-too-large", "Request body over the configured limit"


class Forbidden(APIError):
    status, code, title = 403, "forbidden", "Request from an origin this server does not serve"


class RequestTimeout(APIError):
    status, code, title = 408, "request-timeout", "Request not received in time"


class MisdirectedRequest(APIError):
    status, code, title = 421, "misdirected-request", "Host this server does not serve"


class HeadersTooLarge(APIError):
    status, code, title = 431, "headers-too-large", "Request header block over the limit"


class UnsupportedMediaType(APIError):
    status, code, title = 415, "unsupported-media-type", "Unsupported Content-Type"


class InvalidMethod(APIError):
    status, code, title = 422, "invalid-method", "Invalid method spec"


class InvalidGradients(APIError):
    status, code, title = 422, "invalid-gradients", "Invalid gradients"


class NonFinite(APIError):
    status, code, title = 422, "non-finite", "Non-finite value in an input tensor"


class Degenerate(APIError):
    status, code, title = 422, "degenerate", "Method undefined for these gradients"


class Overloaded(APIError):
    status, code, title = 503, "overloaded", "Server overloaded, retry later"


class NotReady(APIError):
    status, code, title = 503, "not-ready", "Server warming up"


class DeviceOutOfMemory(APIError):
    status, code, title = 503, "device-out-of-memory", "Device out of memory for this request"


class InternalError(APIError):
    status, code, title = 500, "internal", "Internal server error"


ERRORS_BY_CODE: dict[str, type[APIError]] = {
    cls.code: cls
    for cls in (
        MalformedBody,
        Unauthorized,
        Forbidden,
        PayloadTooLarge,
        RequestTimeout,
        MisdirectedRequest,
        HeadersTooLarge,
        UnsupportedMediaType,
        InvalidMethod,
        InvalidGradients,
        NonFinite,
        Degenerate,
        Overloaded,
        NotReady,
        DeviceOutOfMemory,
        InternalError,
    )
}

RETRYABLE: tuple[type[APIError], ...] = (Overloaded, NotReady, DeviceOutOfMemory)


def from_problem(
    status: int,
    body: dict[str, Any] | None,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> APIError:
    """Rebuild the typed error from a problem+json body (or from the status alone when there is none)."""
    body = body or {}
    cls = ERRORS_BY_CODE.get(str(body.get("code", "")))
    if cls is None:
        cls = next((c for c in ERRORS_BY_CODE.values() if c.status == status), InternalError)
    err = cls(
        str(body.get("detail") or body.get("title") or f"HTTP {status}"),
        request_id=request_id,
        retry_after=retry_after,
    )
    return err
