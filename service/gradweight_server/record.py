"""One typed record per request: what the access log line and the request metrics are made of.

The middleware creates it and puts it on `request.state.record`; dependencies and routes fill it in (the
method, the error code, stage timings) and hand it what must outlive the route: the admission reservation
and the buffer leases, which `close` returns once the reply has been sent, on every path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .admission import Reservation
from .pool import Lease

STAGES = ("receive", "decode", "compute", "encode")


@dataclass
class RequestRecord:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    method: str | None = None
    error: str | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    body_done: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    reservation: Reservation | None = None
    leases: list[Lease] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in the block to stage `name` (one of STAGES)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    def timing(self) -> dict[str, float]:
        """The stage durations as the reply reports them."""
        return {f"{s}_ms": round(self.stages.get(s, 0.0) * 1000, 3) for s in STAGES}

    def hold(self, lease: Lease) -> Lease:
        """Keep `lease` open until the reply has been sent."""
        self.leases.append(lease)
        return lease

    def close(self) -> None:
        """Return every lease and the reservation, once the last reply byte has left (or never will)."""
        for lease in self.leases:
            lease.close()
        self.leases.clear()
        if self.reservation is not None:
            self.reservation.release()

    def log_line(self, http_method: str, path: str) -> dict[str, Any]:
        line: dict[str, Any] = {
            "request_id": self.request_id,
            "http_method": http_method,
            "path": path,
            "status": self.status or 499,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        if self.method is not None:
            line["method"] = self.method
        if self.error is not None:
            line["error"] = self.error
        if self.stages:
            line.update(self.timing())
        return line
