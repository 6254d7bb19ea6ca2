"""What a reply must hold, known from the request alone, and the checks that hold it to that.

A trainer applies what `combine` returns without looking, so a reply that a broken proxy or a bad deploy
got wrong must fail loudly (`MalformedReply`, with the request ID) rather than become a wrong step. The
tensor names, dtypes and shapes and the weights' group names are checked as soon as the reply's header
has arrived, before its payload is read; the weights' and the vector's finiteness once it is complete.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoding import ReplyMeta, reply_meta
from .errors import MalformedReply
from .methods import PAIR, MethodSpec, method_names, spec_class
from .types import Layout
from .wire import DTYPES, FLOAT_DTYPES, Header

# Room for a reply's header beyond its tensor entries: method spec, weights, gram, timing, device, state.
HEADER_ROOM = 1 << 20
HEADER_PER_GROUP_PAIR = 64
FINITE_SLICE = 1 << 16


def spec_of(method: Mapping[str, Any]) -> type[MethodSpec] | None:
    """The spec class of a method sent by name, or None for a name this client does not know."""
    name = method.get("name")
    return spec_class(name) if isinstance(name, str) and name in method_names() else None


def gives_weights(method: Mapping[str, Any]) -> bool:
    """Whether a reply must carry weights: elementwise methods have none; unknown methods may not."""
    cls = spec_of(method)
    return cls is not None and bool(getattr(cls, "gives_weights", True))


def pair_or(groups: Sequence[str] | None) -> list[str]:
    """The groups a /v1/weights request names: the given ones, else the protocol's default pair."""
    return list(groups) if groups is not None else list(PAIR)


def check_weights(weights: Any, groups: Sequence[str], request_id: str | None) -> dict[str, float]:
    """One finite number per group sent, no other name."""
    if not isinstance(weights, dict):
        raise MalformedReply("reply lacks `weights`", request_id=request_id)
    if set(weights) != set(groups):
        raise MalformedReply(
            f"weights name groups {sorted(map(str, weights))[:8]}, the request sent {sorted(groups)[:8]}",
            request_id=request_id,
        )
    out: dict[str, float] = {}
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise MalformedReply(
                f"weight of {name!r} is {str(value)[:40]!r}, not a finite number", request_id=request_id
            )
        out[name] = float(value)
    return out


@dataclass(frozen=True, slots=True)
class Expected:
    """A combine reply as the request defines it: tensors (names, shapes) in one dtype, and weights for
    the groups sent. `limit` bounds the whole body: the payload's exact size plus room for the header."""

    layout: Layout
    tag: str
    keys: list[str]
    shapes: list[tuple[int, ...]]
    groups: list[str]
    weights_required: bool
    state_chars: int = 0
    numel: int = field(init=False)  # of the shapes, summed once: the properties below ask often

    def __post_init__(self) -> None:
        object.__setattr__(self, "numel", sum(math.prod(s) for s in self.shapes))

    @property
    def entries(self) -> list[tuple[str, tuple[int, ...]]]:
        if self.layout == "flat":
            return [("scaled_grad", (self.numel,))]
        return list(zip(self.keys, self.shapes, strict=True))

    @property
    def payload(self) -> int:
        return self.numel * DTYPES[self.tag][0]

    @property
    def header_cap(self) -> int:
        k = len(self.groups)
        per_entry = sum(len(name) + 24 * len(shape) + 64 for name, shape in self.entries)
        return per_entry + HEADER_ROOM + HEADER_PER_GROUP_PAIR * (k * k + k) + 4 * self.state_chars

    @property
    def limit(self) -> int:
        return 8 + self.header_cap + self.payload

    def check_header(self, header: Header, request_id: str | None) -> ReplyMeta:
        """Names, dtype and shapes of the reply's tensors, and its metadata; raises MalformedReply."""
        got = {t.name: t for t in header.tensors}
        want = self.entries
        if len(got) != len(want) or any(name not in got for name, _ in want):
            raise MalformedReply(
                f"reply has tensors {sorted(got)[:8]}, the request implies {[n for n, _ in want][:8]}",
                request_id=request_id,
            )
        for name, shape in want:
            t = got[name]
            if t.dtype != self.tag:
                raise MalformedReply(
                    f"tensor {name!r} is {DTYPES[t.dtype][1]}, the request implies {DTYPES[self.tag][1]}",
                    request_id=request_id,
                )
            if t.shape != shape:
                raise MalformedReply(
                    f"tensor {name!r} has shape {list(t.shape)} ({t.numel} elements), "
                    f"the request implies {list(shape)} ({math.prod(shape)})",
                    request_id=request_id,
                )
        meta = reply_meta(header, request_id)
        if meta.weights is not None or self.weights_required:
            check_weights(meta.weights, self.groups, request_id)
        return meta


BF16_EXPONENT = 0x7F80  # all ones: infinity or NaN


def all_finite(data: memoryview, tag: str) -> bool:
    """No NaN or infinity among the little-endian `tag` values of `data` (host bytes), scanned in
    cache-sized slices so that no mask of the vector's size is allocated; bfloat16 by its exponent bits,
    which needs no torch."""
    if tag not in FLOAT_DTYPES:
        return True
    bf16 = tag == "BF16"
    values = np.frombuffer(data, dtype="<u2" if bf16 else DTYPES[tag][2])
    mask = np.empty(min(FINITE_SLICE, values.size), dtype=values.dtype if bf16 else bool)
    for lo in range(0, values.size, FINITE_SLICE):
        part = mask[: min(FINITE_SLICE, values.size - lo)]
        if bf16:
            np.bitwise_and(values[lo : lo + FINITE_SLICE], BF16_EXPONENT, out=part)
            if (part == BF16_EXPONENT).any():
                return False
        else:
            np.isfinite(values[lo : lo + FINITE_SLICE], out=part)
            if not part.all():
                return False
    return True
