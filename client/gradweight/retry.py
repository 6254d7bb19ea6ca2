"""When and how long to wait before trying a request again.

Only failures that say nothing about the request itself are retried: the connection failed, or the
server answered 503 (overloaded, warming up, out of device memory). 4xx answers never are: sending the
same bytes again gives the same answer. Combining is a pure function of the request, so a POST is safe to
repeat.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

from .errors import RETRYABLE, TransportError


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with jitter: try `attempts` times in all, waiting about
    `backoff * 2**n` (capped at `max_backoff`, jittered down to half) between tries; a server's
    Retry-After (up to `max_retry_after`, jittered up by a quarter) wins when it is longer."""

    attempts: int = 4
    backoff: float = 0.2
    max_backoff: float = 10.0
    max_retry_after: float = 60.0

    @classmethod
    def of(cls, value: int | Retry) -> Retry:
        """`retries=n` means n retries after the first try."""
        if isinstance(value, Retry):
            return value
        if value < 0:
            raise ValueError("retries must be >= 0")
        return cls(attempts=value + 1)

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        """Connection failures and 503s; not a read timeout (the server is computing and would be asked
        to start over), not a 4xx."""
        cause = exc.__cause__ if isinstance(exc, TransportError) else exc
        if isinstance(cause, httpx.ReadTimeout):
            return False
        return isinstance(exc, (TransportError, httpx.TransportError, *RETRYABLE))

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait after failed try number `attempt` (0-based)."""
        base = min(self.max_backoff, self.backoff * (2**attempt))
        wait = base * (0.5 + random.random() / 2)
        after = getattr(exc, "retry_after", None)
        if isinstance(after, int | float) and after > 0:
            # never earlier than the server asked; up to a quarter later, so that clients turned away
            # together do not all come back together
            wait = max(wait, min(float(after), self.max_retry_after) * (1 + random.random() / 4))
        return float(wait)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
