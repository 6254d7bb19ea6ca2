"""Bounded readers of a reply's bytes: the sans-I/O half of every exchange.

A twin's I/O loop hands each received chunk to a sink (`feed`) and asks it for the reply (`finish`);
the sink never sees a socket. Every sink knows from the request how many bytes the answer may have, so
a larger Content-Length is refused before anything is allocated and an endless body is cut off. A
combine reply's header is checked against the request as soon as it is complete; then one buffer of the
exact size is allocated, the payload is written straight into it (the result's tensors view it) and
each piece is checked finite as it arrives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

import httpx

from . import progress as _progress
from .checks import Expected, all_finite
from .encoding import ReplyMeta
from .errors import MalformedBody, MalformedReply, TransportError, from_problem
from .retry import parse_retry_after
from .tensors import Buffer
from .wire import DTYPES, Header, header_length, parse_header

_S = TypeVar("_S", bound="_Base")
ERROR_BODY_CAP = 64 * 1024
JSON_REPLY_CAP = 16 * 1024 * 1024
SCAN_BATCH = 1 << 20


@dataclass(frozen=True, slots=True)
class ReplyFile:
    """A combine reply: its checked header and metadata, and the buffer holding the whole file."""

    header: Header
    meta: ReplyMeta
    buffer: Buffer


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    request_id: str | None
    content: bytes = b""
    file: ReplyFile | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except (ValueError, RecursionError):
            raise MalformedReply(
                f"reply is not JSON (HTTP {self.status})", request_id=self.request_id
            ) from None


class Sink(Protocol):
    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; False when the rest of the body is not wanted."""

    def finish(self) -> Reply:
        """The reply, once the body has ended; raises when it is incomplete or is an error answer."""

    def __enter__(self) -> Sink: ...
    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def declared_length(headers: httpx.Headers, limit: int, request_id: str | None) -> int | None:
    """Content-Length as an int (None when absent), refused over `limit` before anything is read."""
    value = headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise MalformedReply(f"Content-Length {value[:40]!r} is not a number", request_id=request_id)
    n = int(value)
    if n > limit:
        raise MalformedReply(
            f"Content-Length {n} over the {limit} bytes this request's answer can have", request_id=request_id
        )
    return n


class _Base:
    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class BytesSink(_Base):
    """A small reply (JSON) kept as bytes, refused past `limit`."""

    def __init__(self, status: int, headers: httpx.Headers, request_id: str | None, limit: int) -> None:
        self.status, self.request_id, self.limit = status, request_id, limit
        self.declared = declared_length(headers, limit, request_id)
        self.data = bytearray()

    def feed(self, chunk: bytes) -> bool:
        if len(self.data) + len(chunk) > self.limit:
            raise MalformedReply(f"reply longer than {self.limit} bytes", request_id=self.request_id)
        self.data += chunk
        return True

    def finish(self) -> Reply:
        if self.declared is not None and len(self.data) != self.declared:
            raise TransportError(f"reply truncated: {len(self.data)} of {self.declared} bytes")
        return Reply(self.status, self.request_id, bytes(self.data))


class ErrorSink(_Base):
    """An error answer: its first `ERROR_BODY_CAP` bytes, raised as the typed error they describe."""

    def __init__(self, status: int, headers: httpx.Headers, request_id: str | None) -> None:
        self.status, self.request_id = status, request_id
        self.retry_after = parse_retry_after(headers.get("retry-after"))
        self.data = bytearray()

    def feed(self, chunk: bytes) -> bool:
        self.data += chunk[: ERROR_BODY_CAP - len(self.data)]
        return len(self.data) < ERROR_BODY_CAP

    def finish(self) -> Reply:
        try:
            obj = json.loads(self.data) if self.data else None
        except (ValueError, RecursionError):
            obj = None
        body = obj if isinstance(obj, dict) else None
        raise from_problem(self.status, body, request_id=self.request_id, retry_after=self.retry_after)


class FileSink(_Base):
    """A combine reply (a safetensors file): the header is collected and checked first, then the file is
    written into one buffer of the size the header gives, which must be what the request implies."""

    def __init__(
        self,
        status: int,
        headers: httpx.Headers,
        request_id: str | None,
        expected: Expected,
        alloc: Callable[[int], Buffer],
        progress: bool = False,
    ) -> None:
        self.status, self.request_id, self.expected, self.alloc = status, request_id, expected, alloc
        self.declared = declared_length(headers, expected.limit, request_id)
        self.progress = progress
        self.prefix = bytearray()
        self.file: tuple[Header, ReplyMeta] | None = None
        self.buffer: Buffer | None = None
        self.pos = self.scanned = 0
        self.bar: _progress.Progress = _progress.NULL

    def _bad(self, detail: str) -> MalformedReply:
        return MalformedReply(detail, request_id=self.request_id)

    def feed(self, chunk: bytes) -> bool:
        if self.buffer is None:
            self.prefix += chunk
            if not self._header_done():
                return True
            chunk, self.prefix = bytes(self.prefix), bytearray()
        assert self.buffer is not None
        end = self.pos + len(chunk)
        if end > len(self.buffer.view):
            raise self._bad(f"reply longer than the {len(self.buffer.view)} bytes its header gives")
        self.buffer.view[self.pos : end] = chunk
        self.bar.update(len(chunk))
        self.pos = end
        if self.pos - self.scanned >= SCAN_BATCH:
            self._scan()
        return True

    def _scan(self) -> None:
        """Check the values that arrived for NaN and infinity while they are still in cache, a batch at
        a time (one numpy call per 64 KiB read costs more than the scan itself)."""
        itemsize = DTYPES[self.expected.tag][0]
        upto = self.scanned + (self.pos - self.scanned) // itemsize * itemsize
        if upto > self.scanned:
            assert self.buffer is not None
            if not all_finite(self.buffer.view[self.scanned : upto], self.expected.tag):
                raise self._bad(f"the result holds a NaN or infinity (bytes {self.scanned} to {upto})")
            self.scanned = upto

    def _header_done(self) -> bool:
        """Once the whole header is in: check it, then allocate the buffer the rest goes into."""
        if len(self.prefix) < 8:
            return False
        cap = self.expected.header_cap
        try:
            n = header_length(memoryview(self.prefix), max_header=cap)
            if len(self.prefix) < 8 + n:
                return False
            header = parse_header(memoryview(self.prefix)[8 : 8 + n], None)
        except MalformedBody as exc:
            raise self._bad(exc.detail) from None
        if self.declared is not None and header.end != self.declared:
            raise self._bad(f"header gives {header.end} bytes, Content-Length {self.declared}")
        if header.end > self.expected.limit:
            raise self._bad(f"header gives {header.end} bytes, over the {self.expected.limit} expected")
        meta = self.expected.check_header(header, self.request_id)
        self.file = (header, meta)
        self.scanned = header.data_start
        self.buffer = self.alloc(header.end)
        self.bar = _progress.bar(header.end, "download", self.progress)
        return True

    def finish(self) -> Reply:
        if self.buffer is not None:
            self._scan()
        if self.buffer is None or self.file is None or self.pos != len(self.buffer.view):
            size = self.declared if self.buffer is None else len(self.buffer.view)
            got = self.pos if self.buffer is not None else len(self.prefix)
            raise TransportError(f"reply truncated: {got} of {size if size is not None else '?'} bytes")
        header, meta = self.file
        return Reply(self.status, self.request_id, file=ReplyFile(header, meta, self.buffer))

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.bar.close()
