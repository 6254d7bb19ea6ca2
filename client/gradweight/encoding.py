"""Request and reply bodies of /v1/combine, built and read without copying tensor bytes.

The upload is streamed: the safetensors header, then each tensor's own bytes in 1 MiB slices (httpx's
HTTP/1.1 layer copies each slice once on its way to the socket, never the whole body). The length is
known up front, so the request carries Content-Length and a server can refuse an oversized body before
reading it. The same `Body` object is both a sync and an async stream and can be replayed on retry.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from . import progress as _progress
from .errors import MalformedBody
from .tensors import CHUNK_BYTES, Group, dtype_tag, host_bytes, shape_of
from .wire import Header, build_header, parse


@dataclass(frozen=True, slots=True)
class Blob:
    """One tensor ready for the wire: its name in the file, safetensors dtype tag, shape and host bytes."""

    name: str
    tag: str
    shape: tuple[int, ...]
    data: memoryview


def blobs_of(group_name: str, group: Group) -> list[Blob]:
    return [
        Blob(f"{group_name}/{k}", dtype_tag(a), shape_of(a), host_bytes(a))
        for k, a in zip(group.keys, group.arrays, strict=True)
    ]


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A safetensors file streamed from its parts: header bytes, then each blob's bytes."""

    def __init__(self, header: bytes, blobs: Sequence[Blob], *, progress: bool = False) -> None:
        self.header = header
        self.blobs = list(blobs)
        self.length = len(header) + sum(b.data.nbytes for b in self.blobs)
        self.progress = progress

    def _chunks(self) -> Iterator[bytes | memoryview]:
        yield self.header
        for b in self.blobs:
            data = b.data
            for i in range(0, data.nbytes, CHUNK_BYTES):
                yield data[i : i + CHUNK_BYTES]

    def __iter__(self) -> Iterator[bytes]:
        bar = _progress.bar(self.length, "upload", self.progress)
        try:
            for chunk in self._chunks():
                bar.update(len(chunk))
                yield chunk  # type: ignore[misc]  # memoryview slices: h11 joins them into bytes
        finally:
            bar.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk

    def to_bytes(self) -> bytes:
        """The whole file in memory (tests, small bodies)."""
        return b"".join(self._chunks())


def combine_body(
    groups: dict[str, Group],
    *,
    method: dict[str, Any] | None,
    state: str | None = None,
    progress: bool = False,
) -> Body:
    """The octet-stream body: tensors `<group>/<key>`; metadata `method`, `order` (mapping input),
    `groups` (anything but the forget/retain pair) and `state`."""
    blobs: list[Blob] = []
    for name, group in groups.items():
        blobs.extend(blobs_of(name, group))
    first = next(iter(groups.values()))
    return body_from_blobs(
        blobs,
        method=method,
        order=first.keys if first.named else None,
        group_names=list(groups),
        state=state,
        progress=progress,
    )


def body_from_blobs(
    blobs: Sequence[Blob],
    *,
    method: dict[str, Any] | None,
    order: list[str] | None,
    group_names: list[str],
    state: str | None = None,
    progress: bool = False,
) -> Body:
    meta: dict[str, str] = {}
    if method is not None:
        meta["method"] = json.dumps(method, separators=(",", ":"))
    if order is not None:
        meta["order"] = json.dumps(order, separators=(",", ":"))
    if set(group_names) - {"forget", "retain"}:
        meta["groups"] = json.dumps(group_names, separators=(",", ":"))
    if state is not None:
        meta["state"] = state
    header, _ = build_header(((b.name, b.tag, b.shape) for b in blobs), meta)
    return Body(header, blobs, progress=progress)


@dataclass(frozen=True, slots=True)
class ReplyMeta:
    """The JSON entries of a combine reply's `__metadata__`."""

    method: dict[str, Any]
    weights: dict[str, float] | None
    gram: list[list[float]] | None
    device: str
    timing: dict[str, float]
    state: str | None


def reply_meta(header: Header) -> ReplyMeta:
    """Decode the reply's metadata; a reply that breaks the protocol is a MalformedBody."""
    meta = header.metadata

    def load(key: str, default: Any = None) -> Any:
        if key not in meta:
            return default
        try:
            return json.loads(meta[key])
        except json.JSONDecodeError:
            raise MalformedBody(f"reply metadata {key!r} is not JSON") from None

    weights = load("weights")
    if weights is not None and not isinstance(weights, dict):
        raise MalformedBody("reply `weights` metadata is not an object")
    device = meta.get("device", "")
    if device.startswith('"'):
        device = str(load("device"))
    return ReplyMeta(
        method=load("method", {}),
        weights=None if weights is None else {str(k): float(v) for k, v in weights.items()},
        gram=load("gram"),
        device=device,
        timing={str(k): float(v) for k, v in (load("timing", {}) or {}).items()},
        state=meta.get("state"),
    )


def parse_reply(buf: memoryview) -> tuple[Header, ReplyMeta]:
    header = parse(buf)
    return header, reply_meta(header)
