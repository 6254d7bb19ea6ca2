"""Gradients in, gradients out: the few array operations the client needs, for torch and numpy alike.

torch is optional and never imported here at module level: an input is a torch tensor only if torch is
already in `sys.modules`, and torch output is produced only for torch input.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeAlias

import numpy as np

from .types import Array
from .wire import DTYPES, TAG_BY_NAME

# What a caller may pass as one group: a list of tensors/arrays, a dict key -> tensor or (key, tensor)
# pairs (named_parameters order), or a single tensor/array.
Gradients: TypeAlias = Mapping[str, Array] | Iterable[Array] | Array

CHUNK_BYTES = 1 << 20


def torch_or_none() -> ModuleType | None:
    return sys.modules.get("torch")


def is_torch(x: object) -> bool:
    torch = torch_or_none()
    return torch is not None and isinstance(x, torch.Tensor)


def require_torch() -> ModuleType:
    try:
        import torch
    except ImportError:
        raise ImportError("this needs torch: pip install 'gradweight[torch]'") from None
    return torch


@dataclass(frozen=True, slots=True)
class Group:
    """One group's tensors in gradient order; `named` when the keys came from a mapping (then the
    request carries an explicit `order`)."""

    keys: list[str]
    arrays: list[Array]
    named: bool

    @property
    def numel(self) -> int:
        return sum(math.prod(a.shape) for a in self.arrays)


def as_group(grads: Gradients, what: str) -> Group:
    """Normalise one group; refuses None entries (a parameter that got no gradient)."""
    if isinstance(grads, np.ndarray) or is_torch(grads):
        keys, arrays, named = ["0"], [grads], False
    elif isinstance(grads, Mapping):
        keys, arrays, named = [str(k) for k in grads], list(grads.values()), True
    elif isinstance(grads, Iterable) and not isinstance(grads, str | bytes):
        items = list(grads)
        if items and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str) for i in items):
            # (name, tensor) pairs, as `named_parameters()`-style iterators yield them
            keys, arrays, named = [i[0] for i in items], [i[1] for i in items], True
        else:
            arrays, keys, named = items, [str(i) for i in range(len(items))], False
    else:
        got = type(grads).__name__
        raise TypeError(f"{what}: expected tensors, arrays, a list or a dict of them, got {got}")
    if not arrays:
        raise ValueError(f"{what}: no gradients")
    kind = type(arrays[0])
    if (kind is np.ndarray or is_torch(arrays[0])) and all(type(a) is kind for a in arrays):
        return Group(keys, arrays, named)  # the usual case, checked in one pass
    for k, a in zip(keys, arrays, strict=True):
        if a is None:
            raise ValueError(f"{what}[{k}] is None (a parameter without a gradient?)")
        if not (isinstance(a, np.ndarray) or is_torch(a)):
            raise TypeError(f"{what}[{k}]: expected a torch tensor or numpy array, got {type(a).__name__}")
    return Group(keys, arrays, named)


def shape_of(a: Array) -> tuple[int, ...]:
    return tuple(a.shape)  # ints already: torch.Size and numpy shapes


def dtype_name(a: Array) -> str:
    """'float32', 'bfloat16', … (torch's names, which wire.DTYPES uses)."""
    if isinstance(a, np.ndarray):
        return str(a.dtype.name)
    return str(a.dtype).removeprefix("torch.")


def dtype_tag(a: Array) -> str:
    name = dtype_name(a)
    tag = TAG_BY_NAME.get(name)
    if tag is None:
        raise TypeError(f"dtype {name} has no safetensors tag")
    return tag


def device_of(a: Array) -> str:
    return "cpu" if isinstance(a, np.ndarray) else str(a.device)


def host_bytes(a: Array) -> memoryview:
    """The tensor's bytes, C order, little-endian, on the host: a view when it already is, else one copy."""
    if isinstance(a, np.ndarray):
        arr = a if a.dtype.byteorder in "=|<" else a.astype(a.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        return memoryview(arr.reshape(-1).view(np.uint8).data)
    try:  # the usual case, a CPU tensor in C order that numpy can view: one call
        return memoryview(a.numpy()).cast("B")
    except (RuntimeError, TypeError, ValueError):  # needs grad, another device or dtype, strided, empty
        pass
    t = a.detach() if a.requires_grad else a
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    torch = _torch()
    if t.numel() and t.dtype in (torch.float32, torch.float64, torch.float16):
        return memoryview(t.numpy()).cast("B")  # one numpy view, not three torch views
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _torch() -> ModuleType:
    torch = torch_or_none()
    return torch if torch is not None else require_torch()


class Buffer:
    """One reply buffer, allocated once at the size the reply's header gives, filled in place, then viewed
    as tensors. Host memory comes from numpy even for torch output: numpy asks for transparent huge pages,
    which makes first-touching a fresh 200 MB buffer about 3x cheaper than torch.empty's (0.05 s vs 0.17
    s); only a buffer bound for CUDA is torch's pinned memory."""

    def __init__(self, size: int, *, torch_out: bool, pin: bool = False) -> None:
        self.torch_out = torch_out
        if pin:
            torch = _torch()
            self.raw: Any = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self.view = memoryview(self.raw.numpy())
        else:
            host = np.empty(size, dtype=np.uint8)
            self.raw = _torch().from_numpy(host) if torch_out else host
            self.view = host.data

    def tensor(self, tag: str, shape: tuple[int, ...], begin: int, end: int, device: str = "cpu") -> Array:
        """Bytes [begin, end) as `tag`/`shape`: a view, copied only when misaligned or sent to a device."""
        itemsize, torch_name, np_name = DTYPES[tag]
        if not self.torch_out:
            if np_name is None:
                raise TypeError(f"{torch_name} replies need torch; ask for dtype='float32'")
            count = (end - begin) // itemsize
            return np.frombuffer(self.raw, dtype=np_name, count=count, offset=begin).reshape(shape)
        torch = _torch()
        chunk = self.raw[begin:end]
        if begin % itemsize:
            chunk = chunk.clone()
        out = chunk.view(getattr(torch, torch_name)).view(shape)
        if device != "cpu":
            out = out.to(device)
        return out
