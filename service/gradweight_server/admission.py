"""Admission control: the bytes every request holds, and the compute slots only finished uploads take.

A request is admitted when its headers arrive, with a `Reservation` of the host memory it will hold (its
body, its reply and the temporaries of parsing); the reservation grows as a chunked body arrives, is set to
the exact figure once the body is decoded, and is released only when the reply's last byte has been sent.
Compute slots are taken after the body is read, so uploads still in progress (a slow client) never hold the
slots that finished requests need; a request arriving while every slot is busy is refused at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gradweight.errors import Overloaded, PayloadTooLarge


@dataclass
class Admission:
    """Requests admitted, requests computing and bytes reserved; `bytes` is also changed off the loop."""

    max_requests: int
    max_bytes: int
    retry_after: int
    requests: int = 0
    computing: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _freed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def admit(self, nbytes: int) -> Reservation:
        """Admit a request whose headers have arrived, reserving `nbytes`; Overloaded when full."""
        if self.computing >= self.max_requests:
            raise self._overloaded(f"{self.computing} requests already computing (limit {self.max_requests})")
        reservation = Reservation(self)
        reservation.grow(nbytes)
        self.requests += 1
        return reservation

    def _overloaded(self, why: str) -> Overloaded:
        return Overloaded(why, retry_after=self.retry_after)

    def _change(self, held: int, delta: int) -> None:
        with self._lock:
            if delta > 0 and held + delta > self.max_bytes:
                raise PayloadTooLarge(
                    f"this request needs {held + delta} bytes of memory, over the server's "
                    f"max_inflight_bytes of {self.max_bytes}"
                )
            if delta > 0 and self.bytes + delta > self.max_bytes:
                raise self._overloaded(
                    f"{self.bytes} bytes already held by requests in flight; {delta} more would pass "
                    f"the limit of {self.max_bytes}"
                )
            self.bytes += delta

    @asynccontextmanager
    async def compute_slot(self, wait_s: float) -> AsyncIterator[None]:
        """Hold one of the `max_requests` compute slots, waiting up to `wait_s` for one to free up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self.computing >= self.max_requests:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise self._overloaded(f"no compute slot freed up within {wait_s:g} s") from None
        self.computing += 1
        try:
            yield
        finally:
            self.computing -= 1
            self._freed.set()


class Reservation:
    """The bytes one admitted request holds; `release` returns them and the request's place exactly once."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.nbytes = 0
        self.released = False

    def grow(self, nbytes: int) -> None:
        if nbytes > 0:
            self.admission._change(self.nbytes, nbytes)
            self.nbytes += nbytes

    def resize(self, nbytes: int) -> None:
        """Hold exactly `nbytes` from now on (growing may raise Overloaded or PayloadTooLarge)."""
        delta = nbytes - self.nbytes
        if delta > 0:
            self.grow(delta)
        elif delta < 0:
            self.admission._change(self.nbytes, delta)
            self.nbytes = nbytes

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._change(self.nbytes, -self.nbytes)
            self.nbytes = 0
            self.admission.requests -= 1
