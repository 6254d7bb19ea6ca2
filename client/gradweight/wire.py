"""The safetensors container, parsed and written by hand, strictly and without copying tensor bytes.

`safetensors.torch.load` accepts only `bytes` and copies every tensor; here the header is parsed from the
buffer the body was streamed into and each tensor is a view of that buffer. The checks are the ones a
hostile request needs: a bounded header, a JSON object with unique names, known dtypes,
shape x itemsize == span, spans inside the data, sorted with no overlap, no hole and no trailing byte.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

from .errors import MalformedBody

MAX_HEADER_BYTES = 64 * 1024 * 1024
ALIGN = 8

# safetensors dtype tag -> (itemsize, torch attribute name, numpy dtype or None)
DTYPES: dict[str, tuple[int, str, str | None]] = {
    "F64": (8, "float64", "<f8"),
    "F32": (4, "float32", "<f4"),
    "F16": (2, "float16", "<f2"),
    "BF16": (2, "bfloat16", None),
    "I64": (8, "int64", "<i8"),
    "I32": (4, "int32", "<i4"),
    "I16": (2, "int16", "<i2"),
    "I8": (1, "int8", "|i1"),
    "U64": (8, "uint64", "<u8"),
    "U32": (4, "uint32", "<u4"),
    "U16": (2, "uint16", "<u2"),
    "U8": (1, "uint8", "|u1"),
    "BOOL": (1, "bool", "|b1"),
    "F8_E4M3": (1, "float8_e4m3fn", None),
    "F8_E5M2": (1, "float8_e5m2", None),
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
TAG_BY_NAME: dict[str, str] = {v[1]: k for k, v in DTYPES.items()}
# The protocol's dtype names (`?dtype=`, JSON replies, messages) are these, not the safetensors tags.
FLOAT_NAMES: tuple[str, ...] = tuple(DTYPES[t][1] for t in FLOAT_DTYPES)


class TensorInfo(NamedTuple):
    """One tensor of a safetensors file; `begin`/`end` are absolute byte offsets into the file. A named
    tuple: a header has one per tensor and a frozen dataclass costs several times more to make."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class Header:
    metadata: dict[str, str]
    tensors: list[TensorInfo]
    data_start: int

    @property
    def end(self) -> int:
        """The file size the header implies: where its last tensor ends."""
        return self.tensors[-1].end if self.tensors else self.data_start


def header_length(prefix: bytes | memoryview, *, max_header: int = MAX_HEADER_BYTES) -> int:
    """The JSON header's length from the file's first 8 bytes, bounded before anything is allocated."""
    if len(prefix) < 8:
        raise MalformedBody("safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n < 2:
        raise MalformedBody("safetensors: header length below 2")
    if n > max_header:
        raise MalformedBody(f"safetensors: header length {n} over the limit of {max_header} bytes")
    return int(n)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise MalformedBody(f"safetensors: duplicate header entry {k[:80]!r}")
        seen.add(k)
    raise AssertionError("unreachable")


def parse_header(raw: bytes | memoryview, total_size: int | None, *, max_tensors: int = 1_000_000) -> Header:
    """Validate the JSON header `raw` (the bytes after the length) of a file of `total_size` bytes
    (None: of the size the header implies, for a file whose end has not arrived yet)."""
    data_start = 8 + len(raw)
    try:
        text = bytes(raw).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_unique_object)
    except MalformedBody:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedBody(f"safetensors: header is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise MalformedBody("safetensors: header is not a JSON object")
    meta_raw = obj.pop("__metadata__", {})
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise MalformedBody("safetensors: __metadata__ must map strings to strings")
    if len(obj) > max_tensors:
        raise MalformedBody(f"safetensors: {len(obj)} tensors, over the limit of {max_tensors}")
    infos: list[TensorInfo] = []
    for name, entry in obj.items():
        infos.append(_tensor_info(name, entry, data_start))
    infos.sort(key=itemgetter(3, 4))  # (begin, end)
    cursor = data_start
    for t in infos:
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else "leaves a hole before it"
            raise MalformedBody(f"safetensors: tensor {t.name[:80]!r} {what}")
        cursor = t.end
    if total_size is not None and cursor != total_size:
        if cursor > total_size:
            raise MalformedBody(
                f"safetensors: tensors end at byte {cursor} but the body has {total_size} (truncated?)"
            )
        raise MalformedBody(f"safetensors: {total_size - cursor} trailing bytes after the last tensor")
    return Header(metadata=dict(meta_raw), tensors=infos, data_start=data_start)


def _tensor_info(name: str, entry: Any, data_start: int) -> TensorInfo:
    """The entry checked; the common well-formed case in a few operations, anything else by `_checked`."""
    if type(entry) is dict and len(entry) == 3:
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if type(dtype) is str and type(shape) is list and type(offsets) is list and len(offsets) == 2:
            spec = DTYPES.get(dtype)
            b, e = offsets
            if spec is not None and type(b) is int and type(e) is int and 0 <= b <= e and len(shape) <= 64:
                nbytes = spec[0]
                for d in shape:
                    if type(d) is not int or d < 0:
                        break
                    nbytes *= d
                else:
                    if nbytes == e - b:
                        return TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e)
    return _checked(name, entry, data_start)


def _checked(name: str, entry: Any, data_start: int) -> TensorInfo:
    short = name[:80]
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise MalformedBody(f"safetensors: entry {short!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MalformedBody(f"safetensors: tensor {short!r} has unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 64:
        raise MalformedBody(f"safetensors: tensor {short!r} has an invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise MalformedBody(f"safetensors: tensor {short!r} has invalid data_offsets")
    nbytes = math.prod(shape) * DTYPES[dtype][0]
    if nbytes != offsets[1] - offsets[0]:
        raise MalformedBody(
            f"safetensors: tensor {short!r} spans {offsets[1] - offsets[0]} bytes, its shape needs {nbytes}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def parse(
    buf: bytes | bytearray | memoryview, *, max_header: int = MAX_HEADER_BYTES, max_tensors: int = 1_000_000
) -> Header:
    """Parse a whole safetensors file held in `buf`."""
    view = memoryview(buf)
    n = header_length(view, max_header=max_header)
    if 8 + n > len(view):
        raise MalformedBody(f"safetensors: header length {n} runs past the end of the {len(view)}-byte body")
    return parse_header(view[8 : 8 + n], len(view), max_tensors=max_tensors)


def build_header(
    entries: Iterable[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix included, padded so data starts 8-aligned) for `(name, dtype, shape)`
    entries laid out back to back in the given order; returns it with each tensor's absolute span."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    rel: list[tuple[int, int]] = []
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        rel.append((offset, offset + nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, [(start + a, start + b) for a, b in rel]
