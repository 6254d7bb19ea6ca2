"""Admission control: how many requests and body bytes may be in flight at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from gradweight.errors import Overloaded


class BodyKind(str, Enum):
    SAFETENSORS = "application/octet-stream"
    MULTIPART = "multipart/form-data"
    JSON = "application/json"


@dataclass
class Admission:
    """Counts requests and body bytes in flight; all calls happen on the event loop, so no lock."""

    max_requests: int
    max_bytes: int
    retry_after: int
    requests: int = 0
    bytes: int = 0

    def admit(self, nbytes: int) -> Ticket:
        if self.requests >= self.max_requests:
            raise Overloaded(
                f"{self.requests} requests already in flight (limit {self.max_requests})",
                retry_after=self.retry_after,
            )
        self._check_bytes(nbytes)
        self.requests += 1
        self.bytes += nbytes
        return Ticket(self, nbytes)

    def _check_bytes(self, nbytes: int) -> None:
        if self.bytes + nbytes > self.max_bytes:
            raise Overloaded(
                f"{self.bytes} body bytes already in flight; {nbytes} more would pass "
                f"the limit of {self.max_bytes}",
                retry_after=self.retry_after,
            )


@dataclass
class Ticket:
    """One admitted request; `grow` accounts a chunked body as it arrives."""

    admission: Admission
    nbytes: int
    declared: int | None = None
    limit: int = 0
    kind: BodyKind = BodyKind.SAFETENSORS
    content_type: str = ""
    released: bool = field(default=False)

    def grow(self, nbytes: int) -> None:
        self.admission._check_bytes(nbytes)
        self.admission.bytes += nbytes
        self.nbytes += nbytes

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.requests -= 1
            self.admission.bytes -= self.nbytes
