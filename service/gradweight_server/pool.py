"""Request buffers kept for reuse between requests of the same size.

A fresh large buffer is zero-filled and page-faulted in before the first byte lands in it, which on the
measured machines costs about as much as receiving the bytes; a trainer sends the same size every step, so
the previous step's buffer is reused as is. Reply buffers come back too, but the transport may still hold
a view of one after the handler returns, so a buffer is handed out only once nothing exports it. Only sizes
asked for more than once recently are kept: a one-off size would only sit in the pool until evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class BufferPool:
    """Idle bytearrays by exact size, at most `max_bytes` in all; the oldest go first."""

    RECENT_SIZES = 256

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: OrderedDict[int, list[bytearray]] = OrderedDict()
        self._asked: OrderedDict[int, int] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def take(self, size: int) -> bytearray:
        with self._lock:
            self._asked[size] = self._asked.get(size, 0) + 1
            self._asked.move_to_end(size)
            if len(self._asked) > self.RECENT_SIZES:
                self._asked.popitem(last=False)
            bufs = self._free.get(size, [])
            for i, buf in enumerate(bufs):
                if not _exported(buf):
                    del bufs[i]
                    if not bufs:
                        del self._free[size]
                    self._held -= size
                    return buf
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        size = len(buf)
        if size == 0 or size > self.max_bytes:
            return
        with self._lock:
            if self._asked.get(size, 0) < 2:
                return
            self._free.setdefault(size, []).append(buf)
            self._free.move_to_end(size)
            self._held += size
            while self._held > self.max_bytes:
                old_size, old = next(iter(self._free.items()))
                old.pop(0)
                if not old:
                    del self._free[old_size]
                self._held -= old_size


def _exported(buf: bytearray) -> bool:
    """Whether a view of `buf` is alive (e.g. queued in a transport): CPython refuses to resize it then."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False
