"""Gram mode's local half: which groups, in which gram order, and the final weighted sum (gram.py).

The server sees only the k x k gram and answers one weight per group; the gradients never leave the
trainer. The gram's row order is the method's own (`group_names`, e.g. retain then forget for the
unlearning methods), else the protocol's pair order for forget/retain, else the order the groups were
given in; it is always sent explicitly.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import gram as _gram
from .checks import spec_of
from .errors import Degenerate, NonFinite
from .methods import PAIR
from .tensors import Group, device_of, is_torch
from .types import CombineResult, Layout, WeightsResult


@dataclass(frozen=True)
class GramPlan:
    method: dict[str, Any]
    named: dict[str, Group]
    order: list[str]
    layout: Layout
    dtype: str | None

    @classmethod
    def of(
        cls, named: dict[str, Group], method: dict[str, Any], layout: Layout, dtype: str | None
    ) -> GramPlan:
        spec = spec_of(method)
        names = spec.group_names if spec is not None else None
        if not names and set(named) == set(PAIR):
            names = PAIR  # the pair sent without `groups` is in this order on the server too
        if names:
            unknown = sorted(set(named) - set(names))
            if unknown:
                raise ValueError(f"method {method.get('name')!r} takes groups {list(names)}, not {unknown}")
            order = [g for g in names if g in named]
        else:
            order = list(named)
        return cls(method, named, order, layout, dtype)

    @functools.cached_property
    def ordered(self) -> list[Group]:
        return [self.named[n] for n in self.order]

    @functools.cached_property
    def copies_first(self) -> bool:
        """Whether the first group's run is a fresh copy that the combine overwrites with the result."""
        return _gram.can_copy_first(self.ordered[0].arrays[0], self.dtype)

    @functools.cached_property
    def runs(self) -> list[list[Any]] | None:
        """The groups' flat runs (torch input), found once for both passes (`gram.torch_runs`)."""
        return _gram.torch_runs(self.ordered, copy_first=self.copies_first)

    @property
    def kept(self) -> Any | None:
        """The first group's fresh copy (`copies_first`), which becomes the result; else None."""
        runs = self.runs
        return runs[0][0] if self.copies_first and runs and runs[0] else None

    def gram(self) -> list[list[float]]:
        """The gram, refused as the server refuses full mode's when not finite (nothing is sent then):
        `NonFinite` naming a tensor that holds NaN or infinity, else `Degenerate` (a norm overflowed)."""
        k = _gram.gram(self.ordered, self.runs)
        if not all(math.isfinite(v) for row in k for v in row):
            for name in self.order:
                group = self.named[name]
                for key, a in zip(group.keys, group.arrays, strict=True):
                    if not _finite(a):
                        raise NonFinite(f"group {name!r} key {key!r} contains NaN or infinity")
            raise Degenerate("a gradient's squared norm overflows float64; scale the loss down")
        return k

    def finish(self, k: list[list[float]], w: WeightsResult, t: tuple[float, float, float]) -> CombineResult:
        """The weighted sum of the groups with the server's weights (checked: one per group, finite)."""
        flat, per_key = _gram.combine(
            self.ordered,
            [w.weights[n] for n in self.order],
            layout=self.layout,
            dtype=self.dtype,
            runs=self.runs,
            kept=self.kept,
        )
        t3 = time.perf_counter()
        return CombineResult(
            weights=w.weights,
            method=w.method,
            scaled_grad=flat,
            params=per_key,
            gram=k,
            device=device_of(self.ordered[0].arrays[0]),
            timing={
                "gram_ms": (t[1] - t[0]) * 1e3,
                "weights_ms": (t[2] - t[1]) * 1e3,
                "combine_ms": (t3 - t[2]) * 1e3,
            },
            state=w.state,
            request_id=w.request_id,
            mode="gram",
        )


def _finite(a: Any) -> bool:
    if is_torch(a):
        return bool(a.detach().isfinite().all())
    return bool(np.isfinite(a).all())
