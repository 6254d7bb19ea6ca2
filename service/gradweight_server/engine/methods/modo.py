"""`modo`: torchjd's MoDoWeighting on our gram, its task weights carried in the request's `state`.

The state is `{"method": "modo", "groups": [...], "step": t, "lambda": [...]}` (float64 as JSON numbers);
restored into a fresh MoDoWeighting, step t gives what torchjd's own object gives at step t. torchjd feeds
MoDo J1 J2ᵀ from two independent batches; here it is the gram of the one set of gradients sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import MoDo

from ._method import Method
from ._torchjd import check_state, envelope, finite_state, finite_tensor


def weights(
    spec: MoDo, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    from torchjd.aggregation import MoDoWeighting

    assert gram is not None
    k = len(names)
    restored = check_state(state, spec.name, names, ("lambda",))
    weighting = MoDoWeighting(gamma=spec.gamma, rho=spec.rho)
    if restored is not None:
        weighting.register_buffer("_lambda", finite_tensor(restored["lambda"], (k,), "lambda"))
        weighting._state_key = (k, gram.dtype, gram.device)
    w = weighting(gram)
    step = 0 if restored is None else int(restored["step"])
    return w, envelope(
        spec, names, step + 1, **{"lambda": finite_state(weighting._lambda, spec.name, "lambda")}
    )


METHOD = Method(MoDo, weights=weights, requires=("torchjd",), torchjd="MoDoWeighting")
