"""Request buffers kept for reuse between requests of the same size.

A fresh large buffer is zero-filled and page-faulted in before the first byte lands in it, which on the
measured machines costs about as much as receiving the bytes; a trainer sends the same size every step, so
the previous step's buffer is reused as is. Reply buffers come back too, but the transport may still hold
a view of one after the handler returns, so a buffer is handed out only once nothing exports it. Only sizes
asked for more than once recently are kept: a one-off size would only sit in the pool until evicted.

Buffers are handed out as `Lease`s, which give their buffer back exactly once whichever path a request
takes (success, error or disconnect); the request record closes any lease still open when the reply is sent.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections import OrderedDict
from types import TracebackType

# A body buffer: a bytearray, or an anonymous mmap, whose pages are committed only as bytes land in them.
Buffer = bytearray | mmap.mmap
HUGE_FROM = 2 << 20


def fresh(size: int) -> Buffer:
    """A new zero-filled buffer: from 2 MiB on a private anonymous mmap that asks for transparent huge
    pages, else a bytearray. Where the kernel gives huge pages only on request (`madvise`), first-touching
    a 200 MB bytearray or shared mmap (Python's default) cost 110-130 ms against 53 ms this way, and the
    passes over the data miss the TLB less."""
    if size < HUGE_FROM:
        return bytearray(size)
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buf = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            buf.madvise(advice)
    return buf


class Lease:
    """A buffer borrowed from a pool; `close` (or leaving the `with` block) gives it back, once."""

    __slots__ = ("buffer", "closed", "pool")

    def __init__(self, pool: BufferPool, buffer: Buffer) -> None:
        self.pool = pool
        self.buffer = buffer
        self.closed = False

    def __len__(self) -> int:
        return len(self.buffer)

    def close(self) -> None:
        """Give the buffer back and drop this lease's reference, so an unpooled buffer is freed now."""
        if not self.closed:
            self.closed = True
            buf, self.buffer = self.buffer, bytearray()
            self.pool.give(buf)

    def __enter__(self) -> Buffer:
        return self.buffer

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BufferPool:
    """Idle bytearrays by exact size, at most `max_bytes` in all; the oldest go first."""

    RECENT_SIZES = 256

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: OrderedDict[int, list[Buffer]] = OrderedDict()
        self._asked: OrderedDict[int, int] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def lease(self, size: int) -> Lease:
        """A buffer of exactly `size` bytes: a pooled one, or a fresh (zero-filled) one."""
        return Lease(self, self.take(size))

    def reuse(self, size: int) -> Lease | None:
        """A pooled buffer of exactly `size` bytes, or None: memory already committed, nothing new."""
        buf = self._pop(size)
        return Lease(self, buf) if buf is not None else None

    def adopt(self, buf: Buffer) -> Lease:
        """Lease a buffer made elsewhere, so it joins the pool when closed."""
        return Lease(self, buf)

    def take(self, size: int) -> Buffer:
        buf = self._pop(size)
        return buf if buf is not None else fresh(size)

    def _pop(self, size: int) -> Buffer | None:
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
        return None

    def give(self, buf: Buffer) -> None:
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


def _exported(buf: Buffer) -> bool:
    """Whether a view of `buf` is alive (e.g. queued in a transport): CPython refuses to resize it then."""
    try:
        if isinstance(buf, mmap.mmap):
            buf.resize(len(buf))
            return False
        buf.append(0)
    except BufferError:
        return True
    except (OSError, SystemError):  # no mremap (not Linux): an mmap is then never handed out again
        return True
    del buf[-1]
    return False
