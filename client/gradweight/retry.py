"""When and how long to wait before trying a request again.

Only failures that say nothing about the request itself are retried: the connection failed, or the
server answered 503 (overloaded, warming up, out of device memory). 4xx answers never are: sending the
same bytes again gives the same answer. Combining is a pure function of the request, so a POST is safe to
repeat.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass

import httpx

from .errors import RETRYABLE, TransportError


@dataclass(frozen=True, slots=True)
class Retry:
    """Retries bounded by time, not by a count: a failed try is retried while the next one would start
    within `deadline` seconds of the first (60 s by default, so a call rides through a restart of the
    server or of its container), and at most `attempts` tries in all when that is set.

    The wait before retry n is about `backoff * 2**n`, capped at `max_backoff` and jittered down to half
    (clients turned away together do not come back together); a server's Retry-After wins when longer,
    capped at `max_retry_after` and jittered up by a quarter. A wait that would end past the deadline is
    not taken: the last error is raised at once instead."""

    deadline: float = 60.0
    attempts: int | None = None
    backoff: float = 0.2
    max_backoff: float = 2.0
    max_retry_after: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be >= 1 (or None: as many as the deadline allows)")
        for name in ("deadline", "backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")

    @classmethod
    def of(cls, value: int | Retry | None) -> Retry:
        """`None`: the default policy; `retries=n`: at most n retries after the first try (and still
        within the default deadline); `0`: never retry."""
        if value is None:
            return cls()
        if isinstance(value, Retry):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"retries must be an int or a gradweight.Retry, not {type(value).__name__}")
        if value < 0:
            raise ValueError("retries must be >= 0")
        return cls(attempts=value + 1)

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        """Connection failures and 503s; not a read timeout (the server is computing and would be asked
        to start over), not a 4xx, not a malformed reply."""
        cause = exc.__cause__ if isinstance(exc, TransportError) else exc
        if isinstance(cause, httpx.ReadTimeout):
            return False
        return isinstance(exc, (TransportError, httpx.TransportError, *RETRYABLE))

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait after failed try number `attempt` (0-based)."""
        base = min(self.max_backoff, self.backoff * (2 ** min(attempt, 64)))
        wait = base * (0.5 + random.random() / 2)
        after = getattr(exc, "retry_after", None)
        if isinstance(after, int | float) and after > 0:
            wait = max(wait, min(float(after), self.max_retry_after) * (1 + random.random() / 4))
        return float(wait)

    def wait(self, attempt: int, exc: BaseException, elapsed: float) -> float | None:
        """The wait before the next try after failed try `attempt`, `elapsed` seconds into the call;
        None when the error is final (not retryable, out of tries, or past the deadline)."""
        if not self.retryable(exc) or (self.attempts is not None and attempt + 1 >= self.attempts):
            return None
        wait = self.delay(attempt, exc)
        return wait if elapsed + wait <= self.deadline else None


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
