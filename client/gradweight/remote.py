"""A drop-in for the seed's `GradientWeightingMethod*` classes, and a helper to write results to `.grad`.

A trainer that called `method.weight_grads(grads_forget, grads_retain, accelerator)` swaps one line:
`method = RemoteWeighting(client, "munba")`. The return value matches the seed's: the flat combined
gradient on `accelerator.device`, shape [N] for `none`, `simple` and the others, and shape [N, 1] for
`munba` (the seed returns `G.T @ alpha` there, a column). Stateful methods carry their state from call to
call inside the instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .client import Client, MethodLike, method_json
from .tensors import is_torch, require_torch
from .types import Array, CombineResult, Mode


class RemoteWeighting:
    """The seed's `weight_grads` served remotely; `last` keeps the latest full result (weights, timing)."""

    def __init__(self, client: Client, method: MethodLike, *, mode: Mode = "full") -> None:
        self.client = client
        self.method = method_json(method)
        self.mode: Mode = mode
        self.state: str | None = None
        self.last: CombineResult | None = None

    def weight_grads(
        self, grads_forget: Sequence[Any], grads_retain: Sequence[Any], accelerator: Any = None
    ) -> Any:
        """The seed's signature and return value; `accelerator` may be None (then the gradients' device).
        numpy arrays in give numpy arrays out (`[N, 1]` for munba too); `accelerator` is then ignored."""
        name = self.method.get("name")
        # The seed's `none` ignores the retain gradients: do not upload them.
        retain = None if name == "none" and self.mode == "full" else grads_retain
        res = self.client.combine(grads_forget, retain, self.method, mode=self.mode, state=self.state)
        self.state, self.last = res.state, res
        out = res.scaled_grad
        assert out is not None
        if accelerator is not None and is_torch(out):
            out = out.to(accelerator.device)
        return out.reshape(-1, 1) if name == "munba" else out  # a view: the result is contiguous


def apply_grads(parameters: Iterable[Any], grad: CombineResult | Array | Sequence[Array]) -> None:
    """Write a combined gradient into the parameters' `.grad`, in order.

    `grad` is a CombineResult (either layout), a flat tensor of the parameters' total size (shape [N] or the
    seed's [N, 1]), or one tensor per parameter. A missing `.grad` becomes a view of the flat vector
    (moved to the parameter's device/dtype), an existing one is overwritten in place.
    """
    torch = require_torch()
    params = list(parameters)
    if isinstance(grad, CombineResult):
        grad = grad.scaled_grad if grad.scaled_grad is not None else grad.tensors
    pieces: list[Any]
    if isinstance(grad, torch.Tensor):
        flat = grad.reshape(-1)
        total = sum(p.numel() for p in params)
        if flat.numel() != total:
            raise ValueError(f"gradient has {flat.numel()} elements, the parameters {total}")
        pieces, pos = [], 0
        for p in params:
            pieces.append(flat[pos : pos + p.numel()].view(p.shape))
            pos += p.numel()
    else:
        pieces = [torch.as_tensor(g) for g in grad]
        if len(pieces) != len(params):
            raise ValueError(f"{len(pieces)} gradients for {len(params)} parameters")
    with torch.no_grad():
        for p, g in zip(params, pieces, strict=True):
            g = g.to(device=p.device, dtype=p.dtype).view(p.shape)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
