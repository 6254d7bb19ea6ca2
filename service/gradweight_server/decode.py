"""Request bodies -> `Parsed`, without copying tensor bytes.

All three body forms become a `Parsed`: tensors still described as spans of the request buffer (or, for
JSON, small tensors), plus the body's method spec, `groups`, `order` and `state`. `views.assemble` then
applies PROTOCOL.md's rules on groups, keys and order and makes the tensor views.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from gradweight import wire
from gradweight.errors import InvalidGradients, InvalidMethod, MalformedBody
from gradweight.methods import PAIR, MethodSpec, parse_method

from . import multipart
from .body import BodyInfo, BodyKind
from .pool import Buffer

GROUP_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
TORCH_DTYPES: dict[str, torch.dtype] = {tag: getattr(torch, wire.DTYPES[tag][1]) for tag in wire.FLOAT_DTYPES}
JSON_FIELDS = frozenset({"method", "forget", "retain", "groups", "state"})
TEXT_PARTS = ("method", "groups", "state", "order")


class Span(NamedTuple):
    """A tensor still lying in the request buffer at absolute bytes [begin, end)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


Source = Span | torch.Tensor


@dataclass
class Parsed:
    buffer: Buffer
    tensors: dict[str, dict[str, Source]] = field(default_factory=dict)
    method: Any = None
    groups: list[str] | None = None
    order: list[str] | None = None
    state: Any = None
    n_tensors: int = 0
    memo: dict[str, Any] | None = None
    """Derived data shared by every body with the same safetensors header (views.assemble's plan); None
    when the body's header is not in the layout cache."""


def _no_hold(nbytes: int) -> None:
    pass


def parse_body(
    info: BodyInfo,
    buf: Buffer,
    *,
    max_header: int,
    max_tensors: int,
    hold: Callable[[int], None] = _no_hold,
) -> Parsed:
    """`hold(n)` is told the size of each JSON text before it is parsed, so its objects can be accounted."""
    if info.kind is BodyKind.SAFETENSORS:
        return parse_safetensors(buf, max_header=max_header, max_tensors=max_tensors, hold=hold)
    if info.kind is BodyKind.MULTIPART:
        return parse_multipart(
            buf, info.content_type, max_header=max_header, max_tensors=max_tensors, hold=hold
        )
    return parse_json_body(buf, max_tensors=max_tensors)


def _header_size(buf: Buffer | memoryview, max_header: int) -> int:
    """The declared length of a safetensors JSON header, capped at what wire.parse will accept."""
    return min(int.from_bytes(buf[:8], "little"), max_header) if len(buf) >= 8 else 0


@dataclass(frozen=True)
class _Layout:
    """What a safetensors header says, shared (read-only) by every request sending the same header bytes."""

    tensors: dict[str, dict[str, Source]]
    metadata: dict[str, str]
    end: int
    header_bytes: int
    n_tensors: int
    memo: dict[str, Any] = field(default_factory=dict, compare=False)

    def fits(self, size: int, max_header: int, max_tensors: int) -> bool:
        """Whether this layout holds for a body of `size` bytes under these limits (they may differ from
        the ones it was parsed under: the cache is the process's)."""
        return self.end == size and self.header_bytes <= max_header and self.n_tensors <= max_tensors


class _Layouts:
    """The last few headers' layouts, keyed by their exact bytes. A trainer sends the same header every
    step, and parsing and checking 512 entries costs milliseconds; the lookup costs one hash."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size, self.max_bytes = size, max_bytes
        self._lru: OrderedDict[bytes, _Layout] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, buf: Buffer, max_header: int, max_tensors: int) -> _Layout:
        n = _header_size(buf, max_header)
        key = bytes(buf[: 8 + n]) if 8 + n <= self.max_bytes and len(buf) >= 8 + n else None
        if key is not None:
            with self._lock:
                hit = self._lru.get(key)
                if hit is not None:
                    self._lru.move_to_end(key)
            if hit is not None and hit.fits(len(buf), max_header, max_tensors):
                return hit
        layout = _parse_layout(buf, max_header, max_tensors)
        if key is not None:
            with self._lock:
                self._lru[key] = layout
                while len(self._lru) > self.size:
                    self._lru.popitem(last=False)
        return layout


def _parse_layout(buf: Buffer, max_header: int, max_tensors: int) -> _Layout:
    header = wire.parse(memoryview(buf), max_header=max_header, max_tensors=max_tensors)
    tensors: dict[str, dict[str, Source]] = {}
    for t in header.tensors:
        group, sep, key = t.name.partition("/")
        spans = tensors.get(group)
        if spans is None:
            if not sep or not GROUP_NAME.match(group):
                raise MalformedBody(f"tensor name {t.name[:80]!r} is not <group>/<key>")
            spans = tensors[group] = {}
        if not key:
            raise MalformedBody(f"tensor name {t.name[:80]!r} is not <group>/<key>")
        spans[key] = Span(t.dtype, t.shape, t.begin, t.end)
    n_tensors = len(header.tensors)
    return _Layout(tensors, header.metadata, header.end, header.data_start - 8, n_tensors)


LAYOUTS = _Layouts(size=32, max_bytes=1 << 20)


def parse_safetensors(
    buf: Buffer, *, max_header: int, max_tensors: int, hold: Callable[[int], None] = _no_hold
) -> Parsed:
    hold(_header_size(buf, max_header))
    layout = LAYOUTS.get(buf, max_header, max_tensors)
    parsed = Parsed(buf, tensors=layout.tensors, n_tensors=layout.n_tensors, memo=layout.memo)
    meta = layout.metadata
    parsed.method = meta.get("method")
    parsed.groups = _group_list(_json_text(meta.get("groups"), "groups"))
    parsed.order = _order(_json_text(meta.get("order"), "order"))
    parsed.state = _json_text(meta.get("state"), "state")
    return parsed


def parse_multipart(
    buf: Buffer,
    content_type: str,
    *,
    max_header: int,
    max_tensors: int,
    hold: Callable[[int], None] = _no_hold,
) -> Parsed:
    parsed = Parsed(buf)
    orders: list[list[str]] = []
    for name, begin, end in multipart.parts(buf, content_type, max_parts=max_tensors + len(TEXT_PARTS)):
        text_part = name in TEXT_PARTS
        if text_part:
            if end - begin > max_header:
                raise MalformedBody(
                    f"multipart part {name!r} is over the {max_header}-byte limit of text parts"
                )
            hold(end - begin)
            try:
                text = buf[begin:end].decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedBody(f"multipart part {name!r} is not UTF-8 text") from None
            if name == "method":
                parsed.method = text
            elif name == "groups":
                parsed.groups = _group_list(_json_text(text, "groups"))
            elif name == "state":
                parsed.state = _json_text(text, "state")
            else:
                orders.append(_order(_json_text(text, "order")) or [])
            continue
        if not GROUP_NAME.match(name):
            raise MalformedBody(f"multipart part name {name[:80]!r} is not a valid group name")
        if name in parsed.tensors:
            raise MalformedBody(f"multipart part {name!r} given twice")
        part = memoryview(buf)[begin:end]
        hold(_header_size(part, max_header))
        header = wire.parse(part, max_header=max_header, max_tensors=max_tensors)
        parsed.n_tensors += len(header.tensors)
        if parsed.n_tensors > max_tensors:
            raise MalformedBody(f"more than {max_tensors} tensors in the request")
        parsed.tensors[name] = {
            t.name: Span(t.dtype, t.shape, begin + t.begin, begin + t.end) for t in header.tensors
        }
        part_order = _order(_json_text(header.metadata.get("order"), "order"))
        if part_order is not None:
            orders.append(part_order)
    if orders:
        if any(o != orders[0] for o in orders[1:]):
            raise InvalidGradients("the parts give different `order` metadata")
        parsed.order = orders[0]
    return parsed


def json_object(buf: bytes | Buffer, fields: frozenset[str]) -> dict[str, Any]:
    """A JSON body that must be an object with only the given fields; MalformedBody otherwise."""
    try:
        obj = json.loads(buf if isinstance(buf, (bytes, bytearray)) else bytes(buf))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedBody("body is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise MalformedBody("JSON body must be an object")
    unknown = sorted(set(obj) - fields)
    if unknown:
        raise MalformedBody(f"unknown JSON field(s) {unknown}; expected {sorted(fields)}")
    return obj


def parse_json_body(buf: Buffer, *, max_tensors: int) -> Parsed:
    obj = json_object(buf, JSON_FIELDS)
    parsed = Parsed(buf, method=obj.get("method"))
    state = obj.get("state")
    parsed.state = _json_text(state, "state") if isinstance(state, str) else state
    if "groups" in obj:
        if "forget" in obj or "retain" in obj:
            raise MalformedBody("give either `groups` or `forget`/`retain`, not both")
        raw = obj["groups"]
        if not isinstance(raw, dict):
            raise MalformedBody("`groups` must be an object mapping group names to lists of tensors")
        parsed.groups = _group_list(list(raw))
    else:
        raw = {g: obj[g] for g in PAIR if g in obj}
    for group, tensors in raw.items():
        if not isinstance(tensors, list) or not all(isinstance(t, list) for t in tensors):
            raise InvalidGradients(f"group {group!r} must be a list of lists of numbers")
        parsed.n_tensors += len(tensors)
        if parsed.n_tensors > max_tensors:
            raise MalformedBody(f"more than {max_tensors} tensors in the request")
        made: dict[str, Source] = {}
        for i, values in enumerate(tensors):
            try:
                t = torch.tensor(values, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                t = None
            if t is None or t.dim() != 1:
                raise InvalidGradients(f"group {group!r} key '{i}': must be a flat list of numbers")
            made[str(i)] = t
        parsed.tensors[group] = made
    return parsed


def resolve_method(body_method: Any, query_method: str | None) -> MethodSpec:
    """The spec from the body or the `method=` query shorthand: exactly one of the two."""
    if body_method is not None and query_method is not None:
        raise InvalidMethod("method spec given twice: in the body and as the `method` query parameter")
    if body_method is None and query_method is None:
        raise InvalidMethod("no method spec: give one in the body or as `?method=<name>`")
    if query_method is not None:
        return parse_method({"name": query_method})
    if not isinstance(body_method, (str, dict)):
        raise InvalidMethod("method spec must be a JSON object with a `name`")
    try:
        return parse_method(body_method)
    except (ValueError, RecursionError):
        raise InvalidMethod("method spec is not valid JSON") from None


def _json_text(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedBody(f"`{what}` is not valid JSON text") from None


def _group_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise InvalidGradients("`groups` must be a JSON list of group names")
    bad = [g for g in value if not GROUP_NAME.match(g)]
    if bad:
        raise InvalidGradients(f"group name {bad[0][:80]!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
    if len(set(value)) != len(value):
        raise InvalidGradients("`groups` names a group twice")
    return value


def _order(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise InvalidGradients("`order` must be a JSON list of keys")
    if len(set(value)) != len(value):
        raise InvalidGradients("`order` lists a key twice")
    return value
