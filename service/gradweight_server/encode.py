"""Replies: a safetensors file whose data region the result is computed into, or a JSON document.

The header goes first in a safetensors file but its metadata (weights, gram, timing) is known only after
the compute, so room for it is reserved up front and the JSON is padded with spaces to fill it, as the
safetensors writers pad for alignment. Only if the metadata outgrows the room is the data copied once.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from gradweight import wire

from .pool import Buffer, Lease

_ROOM_BASE = 2048
_ROOM_PER_GRAM_ENTRY = 32
_ROOM_STATEFUL = 8192


@dataclass
class OctetReply:
    """A reply buffer laid out before the compute; `out` views its data region (CPU only)."""

    entries: list[tuple[str, str, Sequence[int]]]
    lease: Lease
    room: int
    data_start: int
    nbytes: int

    @property
    def buffer(self) -> Buffer:
        return self.lease.buffer

    def out(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return torch.frombuffer(self.buffer, dtype=dtype, count=numel, offset=self.data_start)

    def finish(self, metadata: dict[str, str]) -> memoryview:
        """Write the header; the bytes to send (the whole buffer unless the metadata did not fit, in which
        case the data is copied once to a new buffer and the leased one goes back at once)."""
        full, _ = wire.build_header(self.entries, metadata)
        text = full[8:].rstrip(b" ")
        if len(text) <= self.room:
            self.buffer[:8] = struct.pack("<Q", self.room)
            self.buffer[8 : 8 + len(text)] = text
            self.buffer[8 + len(text) : self.data_start] = b" " * (self.room - len(text))
            return memoryview(self.buffer)
        grown = bytearray(full)
        grown += memoryview(self.buffer)[self.data_start : self.data_start + self.nbytes]
        self.lease.close()
        return memoryview(grown)


def plan_octet(
    keys: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    numel: int,
    dtype: torch.dtype,
    *,
    layout: str,
    n_groups: int,
    spec_json: str,
    state_chars: int | None,
    lease: Callable[[int], Lease],
) -> OctetReply:
    tag = wire.TAG_BY_NAME[str(dtype).removeprefix("torch.")]
    entries: list[tuple[str, str, Sequence[int]]]
    if layout == "params":
        entries = [(k, tag, s) for k, s in zip(keys, shapes)]
    else:
        entries = [("scaled_grad", tag, (numel,))]
    bare, _ = wire.build_header(entries)
    room = (
        len(bare) - 8 + _ROOM_BASE + len(spec_json) + _ROOM_PER_GRAM_ENTRY * (n_groups * n_groups + n_groups)
    )
    if state_chars is not None:
        room += _ROOM_STATEFUL + 2 * state_chars + 2 * _ROOM_PER_GRAM_ENTRY * n_groups * n_groups
    room += -(8 + room) % wire.ALIGN
    data_start = 8 + room
    nbytes = numel * dtype.itemsize
    return OctetReply(entries, lease(data_start + nbytes), room, data_start, nbytes)


def reply_metadata(
    method: dict[str, Any],
    weights: dict[str, float] | None,
    gram: list[list[float]] | None,
    device: str,
    timing: dict[str, float],
    state: Any,
) -> dict[str, str]:
    meta = {"method": json.dumps(method, separators=(",", ":"))}
    if weights is not None:  # the elementwise methods give none
        meta["weights"] = json.dumps(weights, separators=(",", ":"))
    meta |= {"device": device, "timing": json.dumps(timing, separators=(",", ":"))}
    if gram is not None:
        meta["gram"] = json.dumps(gram, separators=(",", ":"))
    if state is not None:
        meta["state"] = json.dumps(state, separators=(",", ":"))
    return meta


def json_reply(
    *,
    method: dict[str, Any],
    weights: dict[str, float] | None,
    gram: list[list[float]] | None,
    flat: torch.Tensor,
    device: str,
    timing: dict[str, float],
    state: Any,
    max_elements: int,
) -> dict[str, Any]:
    numel = flat.numel()
    body: dict[str, Any] = {
        "method": method,
        "weights": weights,
        "gram": gram,
        "numel": numel,
        "dtype": str(flat.dtype).removeprefix("torch."),
        "norm": float(torch.linalg.vector_norm(flat, dtype=torch.float64)),
        "device": device,
        "timing": timing,
        "scaled_grad": flat.cpu().tolist() if numel <= max_elements else None,
    }
    if weights is None:  # the elementwise methods give none
        del body["weights"]
    if state is not None:
        body["state"] = json.dumps(state, separators=(",", ":"))
    return body
