"""`pcd`: torchjd's PCDWeighting on our gram, its moving average carried in the request's `state`.

The first group (in request order) is the primary objective. The state is `{"method": "pcd", "groups":
[...], "step": t, "sq_norm_ema": [...]}`; t is also torchjd's `_n_steps`, which debiases the average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import InvalidMethod
from gradweight.methods import PCD

from ._method import Method
from ._torchjd import check_state, envelope, finite_state, finite_tensor


def weights(
    spec: PCD, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    from torchjd.aggregation import PCDWeighting

    assert gram is not None
    k = len(names)
    tau: float | torch.Tensor = (
        spec.tau if isinstance(spec.tau, float) else torch.tensor(spec.tau, dtype=torch.float64)
    )
    if isinstance(tau, torch.Tensor) and tau.numel() != k - 1:
        raise InvalidMethod(f"pcd: tau has {tau.numel()} entries for {k - 1} secondary groups")
    restored = check_state(state, spec.name, names, ("sq_norm_ema",))
    step = 0 if restored is None else int(restored["step"])
    weighting = PCDWeighting(tau=tau, beta=spec.beta, eps=spec.eps)
    if restored is not None:
        weighting.register_buffer("_sq_norm_ema", finite_tensor(restored["sq_norm_ema"], (k,), "sq_norm_ema"))
        weighting.register_buffer("_n_steps", torch.tensor(step))
        weighting._state_key = k
    w = weighting(gram)
    return w, envelope(
        spec, names, step + 1, sq_norm_ema=finite_state(weighting._sq_norm_ema, spec.name, "EMA")
    )


METHOD = Method(
    PCD, weights=weights, requires=("torchjd",), torchjd="PCDWeighting", permutation_invariant=False
)
