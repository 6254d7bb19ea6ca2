"""Checks on the gradient groups before any pass runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from gradweight.errors import InvalidGradients

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_groups(groups: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str]) -> torch.dtype:
    """Raise InvalidGradients unless every group has the same keys and shapes in one float dtype;
    return that dtype."""
    if not groups:
        raise InvalidGradients("no gradient groups given")
    n_keys = len(keys)
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    reference: Sequence[torch.Tensor] | None = None
    for name, tensors in groups.items():
        if len(tensors) == 0:
            raise InvalidGradients(f"group {name!r} is empty")
        if len(tensors) != n_keys:
            raise InvalidGradients(f"group {name!r} has {len(tensors)} tensors, expected {n_keys}")
        for key, t in zip(keys, tensors):
            if t.dtype not in FLOATS:
                raise InvalidGradients(f"group {name!r} key {key!r}: dtype {t.dtype} is not a float type")
            if dtype is None:
                dtype, device = t.dtype, t.device
            elif t.dtype != dtype:
                raise InvalidGradients(f"group {name!r} key {key!r}: dtype {t.dtype} differs from {dtype}")
            elif t.device != device:
                raise InvalidGradients(f"group {name!r} key {key!r}: on {t.device}, others on {device}")
        if reference is None:
            reference = tensors
            continue
        for key, a, b in zip(keys, reference, tensors):
            if a.shape != b.shape:
                raise InvalidGradients(
                    f"key {key!r}: shape {tuple(b.shape)} in group {name!r} differs from {tuple(a.shape)}"
                )
    assert dtype is not None
    assert reference is not None
    if sum(t.numel() for t in reference) == 0:
        raise InvalidGradients("the gradients have no elements")
    return dtype
