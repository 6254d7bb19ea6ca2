"""Checks on the gradient groups before any pass runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from gradweight.blocks import Packed
from gradweight.errors import InvalidGradients

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_groups(groups: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str]) -> torch.dtype:
    """Raise InvalidGradients unless every group has the same keys and shapes in one float dtype on one
    device; return that dtype. Whole-group comparisons first (a few C-level passes for hundreds of
    tensors); the key-by-key search only runs to name the culprit of an error."""
    if not groups:
        raise InvalidGradients("no gradient groups given")
    packed = _packed_dtype(groups, keys)
    if packed is not None:
        return packed
    n_keys = len(keys)
    first = next(iter(groups.values()))
    if len(first) == 0:
        raise InvalidGradients(f"group {next(iter(groups))!r} is empty")
    dtype, device = first[0].dtype, first[0].device
    reference: list[torch.Size] | None = None
    for name, tensors in groups.items():
        if len(tensors) == 0:
            raise InvalidGradients(f"group {name!r} is empty")
        if len(tensors) != n_keys:
            raise InvalidGradients(f"group {name!r} has {len(tensors)} tensors, expected {n_keys}")
        if {t.dtype for t in tensors} != {dtype} or {t.device for t in tensors} != {device}:
            _name_dtype_or_device(name, tensors, keys, dtype, device)
        shapes = [t.shape for t in tensors]
        if reference is None:
            reference = shapes
        elif shapes != reference:
            key, a, b = next((k, a, b) for k, a, b in zip(keys, reference, shapes) if a != b)
            raise InvalidGradients(f"key {key!r}: shape {tuple(b)} in group {name!r} differs from {tuple(a)}")
    if dtype not in FLOATS:
        raise InvalidGradients(
            f"group {next(iter(groups))!r} key {keys[0]!r}: dtype {dtype} is not a float type"
        )
    if sum(t.numel() for t in first) == 0:
        raise InvalidGradients("the gradients have no elements")
    return dtype


def _packed_dtype(groups: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str]) -> torch.dtype | None:
    """The dtype of groups that are all `Packed` alike (one float dtype, one device, the same sizes, one
    per key, some elements): what the server's decode hands over. None for anything else, which
    `check_groups` checks tensor by tensor."""
    packs = [p for p in groups.values() if isinstance(p, Packed)]
    if len(packs) != len(groups):
        return None
    head = packs[0]
    dtype, device, sizes = head.flat.dtype, head.flat.device, head.sizes
    alike = all(p.flat.dtype == dtype and p.flat.device == device and p.sizes == sizes for p in packs)
    if alike and dtype in FLOATS and len(sizes) == len(keys) and head.flat.numel() > 0:
        return dtype
    return None


def _name_dtype_or_device(
    name: str, tensors: Sequence[torch.Tensor], keys: Sequence[str], dtype: torch.dtype, device: torch.device
) -> None:
    for key, t in zip(keys, tensors):
        if t.dtype not in FLOATS:
            raise InvalidGradients(f"group {name!r} key {key!r}: dtype {t.dtype} is not a float type")
        if t.dtype != dtype:
            raise InvalidGradients(f"group {name!r} key {key!r}: dtype {t.dtype} differs from {dtype}")
        if t.device != device:
            raise InvalidGradients(f"group {name!r} key {key!r}: on {t.device}, others on {device}")
