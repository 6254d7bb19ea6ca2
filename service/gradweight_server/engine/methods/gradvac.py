"""`gradvac`: torchjd's GradVacWeighting with its EMA targets carried in the request's `state`.

The state is `{"method": "gradvac", "groups": [...], "step": t, "phi": k x k}` (phi the EMA cosine
targets, float64 written exactly as JSON numbers). Restoring it into a fresh GradVacWeighting and calling
it on our gram gives what torchjd's own object gives at step t, so any replica can serve any step.
With `seed`, step t draws its visiting order from the CPU generator seeded with seed + t.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import Degenerate
from gradweight.methods import GradVac

from ._torchjd import call, check_state, finite_matrix, require, seeded


def weights(
    spec: GradVac, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    assert gram is not None
    require(spec)
    from torchjd.aggregation import GradVacWeighting

    k = len(names)
    restored = check_state(state, spec.name, names, ("phi",))
    step = 0 if restored is None else int(restored["step"])
    weighting = GradVacWeighting(beta=spec.beta, eps=spec.eps)
    if restored is not None:
        weighting.register_buffer("_phi_t", finite_matrix(restored["phi"], k, "phi"))
        weighting._state_key = (k, torch.float64)
    seed = None if spec.seed is None else spec.seed + step

    def compute() -> torch.Tensor:
        with seeded(seed):
            return weighting(gram.to(torch.float64))

    w = call(spec, compute)
    phi = weighting._phi_t
    if phi is None or not bool(torch.isfinite(phi).all()):
        raise Degenerate("gradvac: the cosine targets are not finite for these gradients")
    return w, {"method": spec.name, "groups": list(names), "step": step + 1, "phi": phi.tolist()}
