"""`nash_mtl`: torchjd's NashMTL (the paper's reference algorithm, cvxpy/ECOS) on our gram, state in JSON.

torchjd's NashMTL is a matrix weighting, but it reads the matrix only through G G^T and |w^T G|, so its
step is replayed here on the gram: same normalisation, same `_solve_optimization` (torchjd's code, on a
torchjd `_NashMTLWeighting`), same update schedule and max_norm clipping. Its warm start travels in the
state `{"method": "nash_mtl", "groups": [...], "step": t, "prvs_alpha": [...], "prvs_alpha_dtype": ...}`.
The compiled cvxpy problems (they depend only on the group count) are pooled per count.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from gradweight.errors import InvalidMethod
from gradweight.methods import NashMTL

from ._method import CVXPY_ECOS, Method
from ._torchjd import check_state, envelope

POOL_GROUP_COUNTS = 16
POOL_PER_COUNT = 4
_pool: OrderedDict[int, list[Any]] = OrderedDict()
_pool_lock = threading.Lock()
_DTYPES = ("float32", "float64")
# Nash-MTL's problem is not DPP by construction; cvxpy says so on every solve. Filtered once, by message
# (warnings.catch_warnings is not thread-safe).
warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")


def _acquire(k: int) -> Any:
    with _pool_lock:
        idle = _pool.get(k)
        if idle:
            _pool.move_to_end(k)
            return idle.pop()
    from torchjd.aggregation._nash_mtl import _NashMTLWeighting

    w = _NashMTLWeighting(n_tasks=k, max_norm=0.0, update_weights_every=1, optim_niter=1)
    w._init_optim_problem()
    return w


def _release(k: int, w: Any) -> None:
    with _pool_lock:
        idle = _pool.setdefault(k, [])
        _pool.move_to_end(k)
        if len(idle) < POOL_PER_COUNT:
            idle.append(w)
        while len(_pool) > POOL_GROUP_COUNTS:
            _pool.popitem(last=False)


def _restore_alpha(state: dict[str, Any], k: int) -> Any:
    import numpy as np

    dtype = state.get("prvs_alpha_dtype", "float64")
    values = state["prvs_alpha"]
    if dtype not in _DTYPES or not isinstance(values, list) or len(values) != k:
        raise InvalidMethod(f"nash_mtl: `state.prvs_alpha` must be {k} numbers")
    try:
        alpha = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        raise InvalidMethod("nash_mtl: `state.prvs_alpha` must be numbers") from None
    if not bool(np.isfinite(alpha).all()):
        raise InvalidMethod("nash_mtl: `state.prvs_alpha` must be finite")
    return alpha


def weights(
    spec: NashMTL, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    assert gram is not None
    import numpy as np

    k = len(names)
    restored = check_state(state, spec.name, names, ("prvs_alpha",))
    prvs_alpha = np.ones(k, dtype=np.float32) if restored is None else _restore_alpha(restored, k)
    step = 0 if restored is None else int(restored["step"])

    w = _acquire(k)
    w.optim_niter = spec.optim_niter
    w.prvs_alpha = prvs_alpha
    # torchjd's _NashMTLWeighting.forward, with G G^T replaced by our gram
    if step % spec.update_weights_every == 0:
        w.normalization_factor = torch.norm(gram).numpy().reshape((1,))
        gtg = gram / w.normalization_factor.item()
        alpha = w._solve_optimization(gtg.numpy())  # a failed problem raises and is dropped, not pooled
    else:
        alpha = w.prvs_alpha
    new_alpha = np.asarray(w.prvs_alpha)
    _release(k, w)
    a = torch.from_numpy(np.asarray(alpha)).to(torch.float64)
    if spec.max_norm > 0:
        norm = math.sqrt(max(float(a @ gram @ a), 0.0))
        if norm > spec.max_norm:
            a = (a / norm) * spec.max_norm
    new_state = envelope(
        spec,
        names,
        step + 1,
        prvs_alpha=[float(v) for v in new_alpha.reshape(-1)],
        prvs_alpha_dtype=str(new_alpha.dtype),
    )
    return a, new_state


METHOD = Method(NashMTL, weights=weights, requires=("torchjd", *CVXPY_ECOS), extra="cvxpy", torchjd="NashMTL")
