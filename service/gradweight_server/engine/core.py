"""One weighting step: validate, gram (when the method needs it), weights, combine, check.

Elementwise methods (no weights) replace the gram, weights and combine with one elementwise pass."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from gradweight.blocks import flat_runs
from gradweight.errors import Degenerate, InvalidGradients, NonFinite
from gradweight.methods import MethodSpec

from ..pool import fresh
from .methods import aggregate, solve
from .passes import combine, gram, has_non_finite
from .validate import check_groups


@dataclass(frozen=True)
class Outcome:
    """What a step produced; `flat` is the combined gradient (a view of `out` when one was given).
    `weights` is None for the elementwise methods."""

    weights: dict[str, float] | None
    gram: list[list[float]] | None
    flat: torch.Tensor
    state: Any | None = None


def group_order(spec: MethodSpec, names: Sequence[str]) -> list[str]:
    """The group names in the method's gram order; checks the count and, for the pair methods, the names."""
    n = len(names)
    if spec.group_names is not None:
        unknown = sorted(set(names) - set(spec.group_names))
        missing = [g for g in spec.group_names if g not in names]
        if unknown:
            raise InvalidGradients(
                f"method {spec.name!r} takes groups {list(spec.group_names)}, got {unknown}"
            )
        if spec.min_groups >= len(spec.group_names) and missing:
            raise InvalidGradients(f"method {spec.name!r} needs group {missing[0]!r}")
        if "forget" in spec.group_names and "forget" not in names:
            raise InvalidGradients(f"method {spec.name!r} needs group 'forget'")
        return [g for g in spec.group_names if g in names]
    if n < spec.min_groups or (spec.max_groups is not None and n > spec.max_groups):
        most = spec.max_groups if spec.max_groups is not None else "any"
        raise InvalidGradients(f"method {spec.name!r} takes {spec.min_groups} to {most} groups, got {n}")
    return list(names)


def order_groups(
    spec: MethodSpec, groups: Mapping[str, Sequence[torch.Tensor]]
) -> dict[str, Sequence[torch.Tensor]]:
    """Groups in the method's gram order (`group_order`)."""
    return {g: groups[g] for g in group_order(spec, list(groups))}


def run(
    spec: MethodSpec,
    groups: Mapping[str, Sequence[torch.Tensor]],
    *,
    keys: Sequence[str] | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    state: Any | None = None,
    threads: int = 1,
) -> Outcome:
    """Combine the groups' gradients with `spec`'s weights into one flat tensor; on the CPU `threads`
    share the gram's and the combine's stretches (the same bytes at any count).

    Raises InvalidGradients, NonFinite or Degenerate (gradweight.errors); never returns a non-finite result.
    """
    ordered = order_groups(spec, groups)
    names = list(ordered)
    first = next(iter(ordered.values()))
    keys = list(keys) if keys is not None else [str(i) for i in range(len(first))]
    dtype = check_groups(ordered, keys)
    out_dtype = out_dtype or (out.dtype if out is not None else dtype)
    lead = flat_runs(first)
    numel, device = sum(p.numel() for p in lead), lead[0].device
    if out is None:
        out = empty(numel, out_dtype, device)
    elif out.shape != (numel,) or out.dtype != out_dtype or out.device != device:
        raise ValueError(f"out must be a flat {out_dtype} tensor of {numel} elements on {device}")

    tensors = list(ordered.values())
    if not spec.gives_weights:
        try:
            aggregate(spec, tensors, names, out)  # refuses a non-finite input even where it would be trimmed
        except NonFinite:
            _locate_non_finite(ordered, keys)
            raise
        _check_output(ordered, keys, out)
        return Outcome(weights=None, gram=None, flat=out, state=None)
    runs = [lead if t is first else flat_runs(t) for t in tensors]
    k_matrix: torch.Tensor | None = None
    if spec.needs_gram:
        k_matrix, diag = gram(runs, threads)
        if not bool(torch.isfinite(diag).all()):
            _raise_non_finite(ordered, keys, diag)
    w, new_state = solve(spec, k_matrix, names, state)
    weights = [float(v) for v in w]
    active = [(r, wt) for r, wt in zip(runs, weights) if wt != 0.0] or [(runs[0], 0.0)]
    combine([r for r, _ in active], [wt for _, wt in active], out, threads)

    if k_matrix is None or _may_overflow(k_matrix, weights, out_dtype):
        _check_output(ordered, keys, out)
    return Outcome(
        weights=dict(zip(names, weights)),
        gram=k_matrix.tolist() if k_matrix is not None else None,
        flat=out,
        state=new_state,
    )


HUGE_OUTPUT = 32 << 20  # glibc's largest mmap threshold: below it, freed memory is reused as is


def empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new flat output. One past HUGE_OUTPUT on the CPU lies on `pool.fresh`'s huge pages: malloc maps
    such a block afresh every time, and first-touching 200 MB of its 4 KiB pages measured 90 ms of a 250 ms
    step at 50M (45 ms on huge pages). A smaller one comes from torch: malloc hands back the memory of the
    last step, already touched (a fresh mapping cost 2 ms of a 4 ms step at 1M)."""
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes <= HUGE_OUTPUT:
        return torch.empty(numel, dtype=dtype, device=device)
    return torch.frombuffer(fresh(nbytes), dtype=dtype)


def _may_overflow(k_matrix: torch.Tensor, weights: Sequence[float], dtype: torch.dtype) -> bool:
    """|out_i| <= sum_j |w_j| |g_j|, so a result below the dtype's range needs no check."""
    bound = sum(abs(w) * math.sqrt(v) for w, v in zip(weights, torch.diagonal(k_matrix).tolist()))
    return bound >= float(torch.finfo(dtype).max) / 2


def _raise_non_finite(
    groups: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str], diag: torch.Tensor
) -> None:
    for row, key in enumerate(keys):
        for col, (name, tensors) in enumerate(groups.items()):
            if not bool(torch.isfinite(diag[col])) and has_non_finite(tensors[row]):
                raise NonFinite(f"group {name!r} key {key!r} contains NaN or infinity")
    raise Degenerate("a gradient's squared norm overflows its accumulation dtype; scale the loss down")


def _check_output(
    groups: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str], out: torch.Tensor
) -> None:
    if not has_non_finite(out):
        return
    _locate_non_finite(groups, keys)
    raise Degenerate(f"the weighted sum overflows {str(out.dtype).removeprefix('torch.')}")


def _locate_non_finite(groups: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str]) -> None:
    """NonFinite naming the first group and key holding a NaN or infinity, if any does."""
    for row, key in enumerate(keys):
        for name, tensors in groups.items():
            if has_non_finite(tensors[row]):
                raise NonFinite(f"group {name!r} key {key!r} contains NaN or infinity")
