"""Request bodies -> gradient groups, without copying tensor bytes.

All three body forms become a `Parsed`: tensors still described as spans of the request buffer (or, for
JSON, small tensors), plus the body's method spec, `groups`, `order` and `state`. `assemble` then applies
PROTOCOL.md's rules on groups, keys and order and makes the tensor views, on CPU in place and on CUDA
after one host-to-device copy of the data region.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from gradweight import wire
from gradweight.errors import InvalidGradients, InvalidMethod, MalformedBody
from gradweight.methods import PAIR, MethodSpec, parse_method

from .admission import BodyKind

GROUP_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
DECIMAL_KEY = re.compile(r"(0|[1-9][0-9]*)\Z")
TORCH_DTYPES: dict[str, torch.dtype] = {tag: getattr(torch, wire.DTYPES[tag][1]) for tag in wire.FLOAT_DTYPES}
JSON_FIELDS = frozenset({"method", "forget", "retain", "groups", "state"})
TEXT_PARTS = ("method", "groups", "state", "order")


@dataclass(frozen=True, slots=True)
class Span:
    """A tensor still lying in the request buffer at absolute bytes [begin, end)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


Source = Span | torch.Tensor


@dataclass
class Parsed:
    buffer: bytearray
    tensors: dict[str, dict[str, Source]] = field(default_factory=dict)
    method: Any = None
    groups: list[str] | None = None
    order: list[str] | None = None
    state: Any = None
    n_tensors: int = 0


@dataclass
class Assembled:
    """Groups ready for the engine, and what the reply needs to lay out the result."""

    groups: dict[str, list[torch.Tensor]]
    keys: list[str]
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    numel: int


def parse_body(
    kind: BodyKind, content_type: str, buf: bytearray, *, max_header: int, max_tensors: int
) -> Parsed:
    if kind is BodyKind.SAFETENSORS:
        return parse_safetensors(buf, max_header=max_header, max_tensors=max_tensors)
    if kind is BodyKind.MULTIPART:
        return parse_multipart(buf, content_type, max_header=max_header, max_tensors=max_tensors)
    return parse_json_body(buf, max_tensors=max_tensors)


def parse_safetensors(buf: bytearray, *, max_header: int, max_tensors: int) -> Parsed:
    header = wire.parse(buf, max_header=max_header, max_tensors=max_tensors)
    parsed = Parsed(buf, n_tensors=len(header.tensors))
    for t in header.tensors:
        group, sep, key = t.name.partition("/")
        if not sep or not key or not GROUP_NAME.match(group):
            raise MalformedBody(f"tensor name {t.name[:80]!r} is not <group>/<key>")
        parsed.tensors.setdefault(group, {})[key] = Span(t.dtype, t.shape, t.begin, t.end)
    meta = header.metadata
    parsed.method = meta.get("method")
    parsed.groups = _group_list(_json_text(meta.get("groups"), "groups"))
    parsed.order = _order(_json_text(meta.get("order"), "order"))
    parsed.state = _json_text(meta.get("state"), "state")
    return parsed


def parse_multipart(buf: bytearray, content_type: str, *, max_header: int, max_tensors: int) -> Parsed:
    parsed = Parsed(buf)
    orders: list[list[str]] = []
    for name, begin, end in _multipart_parts(buf, content_type, max_parts=max_tensors + len(TEXT_PARTS)):
        text_part = name in TEXT_PARTS
        if text_part:
            if end - begin > max_header:
                raise MalformedBody(
                    f"multipart part {name!r} is over the {max_header}-byte limit of text parts"
                )
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
        header = wire.parse(memoryview(buf)[begin:end], max_header=max_header, max_tensors=max_tensors)
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


def json_object(buf: bytes | bytearray, fields: frozenset[str]) -> dict[str, Any]:
    """A JSON body that must be an object with only the given fields; MalformedBody otherwise."""
    try:
        obj = json.loads(buf)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedBody("body is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise MalformedBody("JSON body must be an object")
    unknown = sorted(set(obj) - fields)
    if unknown:
        raise MalformedBody(f"unknown JSON field(s) {unknown}; expected {sorted(fields)}")
    return obj


def parse_json_body(buf: bytearray, *, max_tensors: int) -> Parsed:
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


def assemble(parsed: Parsed, device: torch.device) -> Assembled:
    """Apply the group, key and order rules, then view each tensor in place (or on `device`)."""
    present = parsed.tensors
    if parsed.groups is not None:
        names = parsed.groups
        missing = [g for g in names if g not in present]
        if missing:
            raise InvalidGradients(f"group {missing[0]!r} is listed in `groups` but has no tensors")
        extra = [g for g in present if g not in names]
        if extra:
            raise InvalidGradients(f"tensors of group {extra[0]!r}, which `groups` does not list")
    else:
        extra = [g for g in present if g not in PAIR]
        if extra:
            raise InvalidGradients(f"group {extra[0]!r} needs the `groups` entry listing every group")
        names = [g for g in PAIR if g in present]
    if not names:
        raise InvalidGradients("no gradients: expected groups 'forget' and 'retain'")
    for g in names:
        if not present[g]:
            raise InvalidGradients(f"group {g!r} is empty")
    first = present[names[0]]
    for g in names[1:]:
        other = present[g]
        if other.keys() != first.keys():
            diff = sorted(set(first) ^ set(other))[0]
            raise InvalidGradients(f"groups {names[0]!r} and {g!r} differ in their keys (e.g. {diff[:80]!r})")
    keys = _ordered_keys(list(first), parsed.order)
    dtypes = {_dtype_of(src, g, k) for g in names for k, src in present[g].items()}
    if len(dtypes) > 1:
        raise InvalidGradients(f"mixed dtypes {sorted(_name(d) for d in dtypes)}: use one float dtype")
    shapes = [_shape_of(first[k]) for k in keys]
    for g in names[1:]:
        for k, shape in zip(keys, shapes):
            if _shape_of(present[g][k]) != shape:
                raise InvalidGradients(f"key {k[:80]!r}: shape differs between {names[0]!r} and {g!r}")
    numel = sum(_numel(s) for s in shapes)
    if numel == 0:
        raise InvalidGradients("the gradients have no elements")
    views = _views(parsed, names, device)
    groups = {
        g: [
            src.to(device) if isinstance(src, torch.Tensor) else views[src.begin]
            for src in (present[g][k] for k in keys)
        ]
        for g in names
    }
    return Assembled(groups, keys, shapes, dtypes.pop(), numel)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _name(dtype: torch.dtype | str) -> str:
    """The protocol's name of a torch dtype or a safetensors tag: "float32", never "torch.float32"/"F32"."""
    if isinstance(dtype, str):
        return wire.DTYPES[dtype][1] if dtype in wire.DTYPES else dtype
    return str(dtype).removeprefix("torch.")


def _dtype_of(src: Source, group: str, key: str) -> torch.dtype:
    if isinstance(src, torch.Tensor):
        return src.dtype
    if src.dtype not in TORCH_DTYPES:
        name = _name(src.dtype)
        raise InvalidGradients(f"group {group!r} key {key[:80]!r}: dtype {name} is not a float type")
    return TORCH_DTYPES[src.dtype]


def _shape_of(src: Source) -> tuple[int, ...]:
    return tuple(src.shape)


def _views(parsed: Parsed, names: list[str], device: torch.device) -> dict[int, torch.Tensor]:
    """Every span's tensor, keyed by its first byte.

    Spans that follow each other without a gap form a region (the data of one safetensors file); each region
    is viewed as one typed tensor and cut with one `torch.split`, which makes thousands of views far faster
    than slicing them one by one. On CUDA the bytes from the first to the last span go to the device in one
    copy first. A region whose start is not aligned to the itemsize (a multipart part can start anywhere) is
    copied once to aligned memory, as a view there would be misaligned.
    """
    spans = sorted(
        (s for g in names for s in parsed.tensors[g].values() if isinstance(s, Span)), key=lambda s: s.begin
    )
    if not spans:
        return {}
    host = torch.frombuffer(parsed.buffer, dtype=torch.uint8)
    shift = 0
    data = host
    if device.type != "cpu":
        shift = spans[0].begin
        data = host[shift : spans[-1].end].to(device)
    out: dict[int, torch.Tensor] = {}
    region: list[Span] = []
    for span in spans:
        if region and span.begin != region[-1].end:
            out.update(_cut(data, region, shift))
            region = []
        region.append(span)
    out.update(_cut(data, region, shift))
    return out


def _cut(data: torch.Tensor, region: list[Span], shift: int) -> dict[int, torch.Tensor]:
    dtype = TORCH_DTYPES[region[0].dtype]
    raw = data[region[0].begin - shift : region[-1].end - shift]
    if (region[0].begin - shift) % dtype.itemsize:
        raw = raw.clone()
    typed = raw.view(dtype)
    sizes = [(s.end - s.begin) // dtype.itemsize for s in region]
    pieces = torch.split(typed, sizes)
    return {s.begin: piece if len(s.shape) == 1 else piece.view(s.shape) for s, piece in zip(region, pieces)}


def _ordered_keys(keys: list[str], order: list[str] | None) -> list[str]:
    if order is not None:
        if len(order) != len(keys) or set(order) != set(keys):
            raise InvalidGradients("`order` must list every key exactly once")
        return order
    if not all(DECIMAL_KEY.match(k) for k in keys):
        bad = next(k for k in keys if not DECIMAL_KEY.match(k))
        raise InvalidGradients(f"key {bad[:80]!r} is not a decimal integer and no `order` metadata is given")
    return sorted(keys, key=int)


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


_PARAM = re.compile(r';\s*([A-Za-z0-9_\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def _params(header_value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in _PARAM.findall(header_value):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[name.lower()] = value
    return out


def _multipart_parts(buf: bytearray, content_type: str, *, max_parts: int) -> list[tuple[str, int, int]]:
    """(name, begin, end) of each form-data part, located in place (RFC 7578); no part is copied.

    Every group part carries at least one tensor, so more parts than tensors allowed is refused early.
    """
    boundary = _params(content_type).get("boundary")
    if not boundary or len(boundary) > 200:
        raise MalformedBody("multipart Content-Type lacks a valid boundary")
    delim = b"--" + boundary.encode("latin-1")
    pos = buf.find(delim)
    if pos < 0:
        raise MalformedBody("multipart body lacks its boundary")
    parts: list[tuple[str, int, int]] = []
    while True:
        pos += len(delim)
        if buf[pos : pos + 2] == b"--":
            return parts
        if buf[pos : pos + 2] != b"\r\n":
            raise MalformedBody("multipart boundary not followed by CRLF")
        head_end = buf.find(b"\r\n\r\n", pos + 2)
        if head_end < 0 or head_end - pos > 16384:
            raise MalformedBody("multipart part headers are unterminated")
        try:
            head = buf[pos + 2 : head_end].decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedBody("multipart part headers are not UTF-8") from None
        name = None
        for line in head.split("\r\n"):
            field_name, _, value = line.partition(":")
            if field_name.strip().lower() == "content-disposition":
                name = _params(value).get("name")
        if name is None:
            raise MalformedBody("multipart part without Content-Disposition name")
        begin = head_end + 4
        end = buf.find(b"\r\n" + delim, begin)
        if end < 0:
            raise MalformedBody(f"multipart part {name[:80]!r} is not closed by the boundary")
        parts.append((name, begin, end))
        if len(parts) > max_parts:
            raise MalformedBody(f"more than {max_parts} multipart parts")
        pos = end + 2
