"""`sdmgrad`: torchjd's SDMGradWeighting on our gram, its task weights carried in the request's `state`.

The state is `{"method": "sdmgrad", "groups": [...], "step": t, "w": [...]}` (the inner SGD's weights).
torchjd feeds SDMGrad J1 J2ᵀ from two independent batches; here it is the gram of the gradients sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import SDMGrad

from ._method import Method
from ._torchjd import check_state, envelope, finite_state, finite_tensor, pref_tensor


def weights(
    spec: SDMGrad, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    from torchjd.aggregation import SDMGradWeighting

    assert gram is not None
    k = len(names)
    restored = check_state(state, spec.name, names, ("w",))
    weighting = SDMGradWeighting(
        lr=spec.lr,
        momentum=spec.momentum,
        n_iter=spec.n_iter,
        lambda_=spec.lambda_,
        pref_vector=pref_tensor(spec, spec.pref_vector, names),
    )
    if restored is not None:
        weighting.register_buffer("_w", finite_tensor(restored["w"], (k,), "w"))
        weighting._state_key = (k, gram.dtype, gram.device)
    w = weighting(gram)
    step = 0 if restored is None else int(restored["step"])
    return w, envelope(spec, names, step + 1, w=finite_state(weighting._w, spec.name, "task weights"))


METHOD = Method(SDMGrad, weights=weights, requires=("torchjd",), torchjd="SDMGradWeighting")
