"""RFC 7578 multipart/form-data framing: where each part lies in the body buffer, without copying it."""

from __future__ import annotations

import re

from gradweight.errors import MalformedBody

from .pool import Buffer

_PARAM = re.compile(r';\s*([A-Za-z0-9_\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def params(header_value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in _PARAM.findall(header_value):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[name.lower()] = value
    return out


def parts(buf: Buffer, content_type: str, *, max_parts: int) -> list[tuple[str, int, int]]:
    """(name, begin, end) of each form-data part, located in place (RFC 7578); no part is copied.

    Every group part carries at least one tensor, so more parts than tensors allowed is refused early.
    """
    boundary = params(content_type).get("boundary")
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
                name = params(value).get("name")
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
