"""`crmogm`: torchjd's CRMOGMWeighting, an EMA of another method's weights, state in the request.

The state is `{"method": "crmogm", "groups": [...], "step": t, "lambda": [...], "inner": ...}`, `inner`
the wrapped method's own state (null for a stateless one). The wrapped method runs exactly as on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import InvalidMethod
from gradweight.methods import CRMOGM

from ._method import Method
from ._torchjd import by_group, check_state, envelope, finite_state, finite_tensor


def weights(
    spec: CRMOGM, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    from ._registry import require  # the registry imports this file

    inner = spec.weighting
    method = require(inner)
    if method.weights is None:
        raise InvalidMethod(f"crmogm: {inner.name!r} gives no weights")
    k = len(names)
    restored = check_state(state, spec.name, names, ("lambda", "inner"))
    inner_state = restored["inner"] if restored is not None and inner.stateful else None
    w_hat, new_inner = method.weights(inner, gram if inner.needs_gram else None, names, inner_state)
    w_hat = w_hat.to(torch.float64).reshape(-1)
    if restored is not None:
        previous = finite_tensor(restored["lambda"], (k,), "lambda")
    else:
        initial = by_group(spec, "initial_weights", spec.initial_weights, names)
        previous = w_hat if initial is None else initial
    w = spec.alpha * previous + (1.0 - spec.alpha) * w_hat
    step = 0 if restored is None else int(restored["step"])
    return w, envelope(
        spec, names, step + 1, **{"lambda": finite_state(w, spec.name, "weights"), "inner": new_inner}
    )


METHOD = Method(
    CRMOGM,
    weights=weights,
    torchjd="CRMOGMWeighting",
    permutation_invariant=False,
    warm_up={"weighting": {"name": "upgrad"}},
)
