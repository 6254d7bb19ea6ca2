"""Builders for request bodies and a raw-socket HTTP helper for requests httpx refuses to send."""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import safetensors.torch as st
import torch

OCTET = {"content-type": "application/octet-stream"}


def random_groups(
    seed: int,
    shapes: Sequence[tuple[int, ...]] = ((3, 4), (5,), (2, 2, 2)),
    names: Sequence[str] = ("retain", "forget"),
    dtype: torch.dtype = torch.float32,
) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        g: [(torch.randn(s, generator=gen, dtype=torch.float64) * (1 + i)).to(dtype) for s in shapes]
        for i, g in enumerate(names)
    }


def safetensors_body(
    groups: Mapping[str, Sequence[torch.Tensor]],
    *,
    keys: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for g, ts in groups.items():
        ks = keys or [str(i) for i in range(len(ts))]
        for k, t in zip(ks, ts):
            tensors[f"{g}/{k}"] = t.contiguous().clone()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return st.save(tensors, metadata=meta or None)


def part_file(tensors: Sequence[torch.Tensor], keys: Sequence[str] | None = None, order: Any = None) -> bytes:
    ks = keys or [str(i) for i in range(len(tensors))]
    meta = {"order": json.dumps(order)} if order is not None else None
    return st.save({k: t.contiguous() for k, t in zip(ks, tensors)}, metadata=meta)


def multipart_body(parts: Sequence[tuple[str, bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    out = bytearray()
    for name, data in parts:
        out += f"--{boundary}\r\n".encode()
        out += f'Content-Disposition: form-data; name="{name}"; filename="{name}.safetensors"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n"
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def json_body(groups: Mapping[str, Sequence[torch.Tensor]], method: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {g: [t.reshape(-1).tolist() for t in ts] for g, ts in groups.items()}
    if method is not None:
        body["method"] = method
    return body


def problem(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) >= {"type", "title", "status", "detail", "code"}
    assert body["status"] == resp.status_code
    assert "Traceback" not in resp.text
    return body


def expect(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = problem(resp)
    assert body["code"] == code, body
    assert resp.headers.get("x-request-id")
    return body


def load_reply(content: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from gradweight import wire

    header = wire.parse(content)
    return st.load(content), header.metadata


def raw_request(
    url: str,
    head: str,
    body: bytes = b"",
    *,
    shutdown: bool = False,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (request line and headers, CRLF-separated, without the blank line) and `body` verbatim."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    try:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        sock.close()
