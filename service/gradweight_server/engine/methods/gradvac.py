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
from gradweight.methods import GradVac

from ._method import Method
from ._torchjd import check_state, envelope, finite_matrix, finite_state, seeded


def weights(
    spec: GradVac, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    assert gram is not None
    from torchjd.aggregation import GradVacWeighting

    k = len(names)
    restored = check_state(state, spec.name, names, ("phi",))
    step = 0 if restored is None else int(restored["step"])
    weighting = GradVacWeighting(beta=spec.beta, eps=spec.eps)
    if restored is not None:
        weighting.register_buffer("_phi_t", finite_matrix(restored["phi"], k, "phi"))
        weighting._state_key = (k, torch.float64)
    seed = None if spec.seed is None else spec.seed + step

    with seeded(seed):
        w = weighting(gram)
    return w, envelope(spec, names, step + 1, phi=finite_state(weighting._phi_t, spec.name, "cosine targets"))


METHOD = Method(
    GradVac, weights=weights, requires=("torchjd",), torchjd="GradVacWeighting", permutation_invariant=False
)
