"""Gram mode: the trainer computes K = G Gᵀ itself and sends only k x k numbers.

Each tensor is walked in slices that are converted to float64 into k reused scratch buffers (cache-sized,
so there are no fresh allocations to page in), and every pair's dot product is accumulated in float64:
exact to float64 rounding whatever the gradients' dtype, without concatenating the model's gradients.
The weighted sum is formed locally, on the gradients' own device, straight into the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .tensors import Group, dtype_name, is_torch, torch_or_none
from .types import Array

SLICE = 1 << 16  # host: 512 KiB of float64 per group, cache-sized and below every library's threading cutoff
DEVICE_SLICE = 1 << 22
NUMPY_FLOATS = ("float16", "float32", "float64")


def _check(groups: Sequence[Group]) -> None:
    first = groups[0]
    for g in groups[1:]:
        if len(g.arrays) != len(first.arrays):
            raise ValueError("every group needs the same number of tensors")
        for a, b in zip(g.arrays, first.arrays, strict=True):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"shape mismatch between groups: {tuple(a.shape)} vs {tuple(b.shape)}")


def _on_device(a: Array) -> bool:
    return is_torch(a) and a.device.type != "cpu"


def gram(groups: Sequence[Group]) -> list[list[float]]:
    """K[i][j] = <flat(group i), flat(group j)>, accumulated in float64; groups share keys and shapes.

    On the host the work is single-threaded numpy on small slices: trainers' CPUs are busy, and torch's
    or BLAS's thread pools on many small dots under contention cost far more than they save."""
    _check(groups)
    if _on_device(groups[0].arrays[0]):
        return _gram_device(groups)
    k = len(groups)
    acc = np.zeros((k, k), dtype=np.float64)
    scratch = [np.empty(SLICE, dtype=np.float64) for _ in range(k)]
    torch = torch_or_none()
    as_torch = [torch.from_numpy(s) for s in scratch] if torch is not None else []
    for t in range(len(groups[0].arrays)):
        flats = [_host_flat(g.arrays[t]) for g in groups]
        n = int(flats[0].shape[0])
        for lo in range(0, n, SLICE):
            m = min(SLICE, n - lo)
            for i, x in enumerate(flats):
                if isinstance(x, np.ndarray):
                    np.copyto(scratch[i][:m], x[lo : lo + m], casting="unsafe")
                else:  # a bfloat16 CPU tensor: torch converts
                    as_torch[i][:m].copy_(x[lo : lo + m])
            for i in range(k):
                for j in range(i, k):
                    acc[i, j] += np.einsum("i,i->", scratch[i][:m], scratch[j][:m])
    return _symmetric(acc.tolist())


def _host_flat(a: Array) -> Array:
    """A flat view: numpy for numpy arrays and for CPU tensors numpy can read (not bfloat16)."""
    if isinstance(a, np.ndarray):
        return a.reshape(-1)
    flat = a.detach().reshape(-1)
    return flat if dtype_name(flat) not in NUMPY_FLOATS else flat.numpy()


def _gram_device(groups: Sequence[Group]) -> list[list[float]]:
    """The same on the gradients' GPU, in larger slices, with one synchronisation at the end."""
    torch = torch_or_none()
    assert torch is not None
    k = len(groups)
    device = groups[0].arrays[0].device
    acc = torch.zeros((k, k), dtype=torch.float64, device=device)
    scratch = [torch.empty(DEVICE_SLICE, dtype=torch.float64, device=device) for _ in range(k)]
    with torch.no_grad():
        for t in range(len(groups[0].arrays)):
            flats = [g.arrays[t].detach().reshape(-1) for g in groups]
            n = flats[0].numel()
            for lo in range(0, n, DEVICE_SLICE):
                m = min(DEVICE_SLICE, n - lo)
                views = [s[:m] for s in scratch]
                for v, x in zip(views, flats, strict=True):
                    v.copy_(x[lo : lo + m])
                for i in range(k):
                    for j in range(i, k):
                        acc[i, j] += torch.dot(views[i], views[j])
    rows: list[list[float]] = acc.cpu().tolist()
    return rows


def _symmetric(rows: list[list[float]]) -> list[list[float]]:
    for i in range(len(rows)):
        for j in range(i):
            rows[i][j] = rows[j][i]
    return rows


def combine(
    groups: Sequence[Group], weights: Sequence[float], *, layout: str, dtype: str | None
) -> tuple[Array | None, dict[str, Array]]:
    """sum_i weights[i] * group_i, as one flat vector or one tensor per key. Written straight into the
    output when it has the inputs' dtype; half-precision inputs are summed in float32 and rounded once."""
    a0 = groups[0].arrays[0]
    if not is_torch(a0):
        return _combine_numpy(groups, weights, layout=layout, dtype=dtype)
    if a0.device.type != "cpu" or dtype_name(a0) not in NUMPY_FLOATS or dtype not in (None, *NUMPY_FLOATS):
        return _combine_torch(groups, weights, layout=layout, dtype=dtype)
    # CPU tensors: the same single-threaded numpy path on views, handed back as tensors sharing memory
    torch = torch_or_none()
    assert torch is not None
    views = [Group(g.keys, [x.detach().numpy() for x in g.arrays], g.named) for g in groups]
    flat, per_key = _combine_numpy(views, weights, layout=layout, dtype=dtype)
    return (
        None if flat is None else torch.from_numpy(flat),
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in per_key.items()},
    )


def _combine_numpy(
    groups: Sequence[Group], weights: Sequence[float], *, layout: str, dtype: str | None
) -> tuple[Array | None, dict[str, Array]]:
    first = groups[0]
    in_dtype = np.asarray(first.arrays[0]).dtype
    out_dtype = np.dtype(dtype) if dtype else in_dtype
    work = np.dtype(np.float32) if in_dtype.itemsize < 4 else in_dtype

    def into(t: int, out: Any) -> None:
        """out = sum_i w_i * group_i[t], out of the work dtype and the tensor's shape."""
        np.multiply(groups[0].arrays[t], weights[0], out=out, casting="unsafe")
        for g, w in zip(groups[1:], weights[1:], strict=True):
            out += np.multiply(g.arrays[t], w, dtype=work)

    if layout == "params":
        per_key = {}
        for t, key in enumerate(first.keys):
            out = np.empty(np.shape(first.arrays[t]), dtype=work)
            into(t, out)
            per_key[key] = out.astype(out_dtype, copy=False)
        return None, per_key
    flat = np.empty(first.numel, dtype=out_dtype)
    pos = 0
    for t, a in enumerate(first.arrays):
        size = int(np.size(a))
        if work == out_dtype:
            into(t, flat[pos : pos + size].reshape(np.shape(a)))
        else:
            tmp = np.empty(np.shape(a), dtype=work)
            into(t, tmp)
            flat[pos : pos + size] = tmp.reshape(-1)
        pos += size
    return flat, {}


def _combine_torch(
    groups: Sequence[Group], weights: Sequence[float], *, layout: str, dtype: str | None
) -> tuple[Array | None, dict[str, Array]]:
    torch = torch_or_none()
    assert torch is not None
    first = groups[0]
    a0 = first.arrays[0]
    out_dtype = getattr(torch, dtype) if dtype else a0.dtype
    work = torch.float32 if a0.dtype.itemsize < 4 else a0.dtype

    def into(t: int, out: Any) -> None:
        """Each product rounded before it is added, as the seed's `w_f * f + w_r * r` (add(alpha=) fuses)."""
        torch.mul(groups[0].arrays[t].detach().to(work), weights[0], out=out)
        for g, w in zip(groups[1:], weights[1:], strict=True):
            out.add_(torch.mul(g.arrays[t].detach().to(work), w))

    with torch.no_grad():
        if layout == "params":
            per_key = {}
            for t, key in enumerate(first.keys):
                out = torch.empty(first.arrays[t].shape, dtype=work, device=a0.device)
                into(t, out)
                per_key[key] = out.to(out_dtype)
            return None, per_key
        flat = torch.empty(first.numel, dtype=out_dtype, device=a0.device)
        pos = 0
        for t, a in enumerate(first.arrays):
            size = a.numel()
            if work == out_dtype:
                into(t, flat[pos : pos + size].view(a.shape))
            else:
                tmp = torch.empty(a.shape, dtype=work, device=a0.device)
                into(t, tmp)
                flat[pos : pos + size].copy_(tmp.reshape(-1))
            pos += size
        return flat, {}
