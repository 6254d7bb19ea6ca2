"""`config`: torchjd's ConFIG, from the gram (its direction is a combination of the gradients).

torchjd computes, on the stacked k x n matrix G with unit rows U (zero rows stay zero),
    v = pinv(U) p,   u = v / max(|v|, 1e-12),   d = (sum_i g_i·u) u,
with p the preference vector (default ones). pinv(U) p = Uᵀ pinv(U Uᵀ) p, and U Uᵀ = D⁺ K D⁺ (D the
gradient norms), so with c = pinv(D⁺ K D⁺) p and b = D⁺ c: v = Gᵀ b, |v|² = bᵀ K b, sum_i g_i·v = 1ᵀ K b,
and d = Gᵀ a with a = b (1ᵀ K b) / max(|v|, 1e-12)². The pseudo-inverse is taken in float64 on the
normalised gram (cut-off k·eps64 of its largest eigenvalue); torchjd's pinv of the float32 matrix cuts
singular values below max(k, n)·eps32 of the largest (0.12 at a million parameters), so the two differ
only where the unit gradients are that close to dependent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from gradweight.methods import ConFIG

from ._method import Method
from ._torchjd import pref_tensor

NORMALIZE_EPS = 1e-12


def weights(
    spec: ConFIG, gram: torch.Tensor | None, names: Sequence[str], state: Any = None
) -> tuple[torch.Tensor, None]:
    assert gram is not None
    k = len(names)
    pref = pref_tensor(spec, spec.pref_vector, names)
    p = pref if pref is not None else torch.ones(k, dtype=torch.float64)
    norms = torch.diagonal(gram).clamp(min=0.0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    units_gram = gram * torch.outer(inv, inv)
    b = inv * (torch.linalg.pinv(units_gram, hermitian=True) @ p)
    kb = gram @ b
    v_norm = max(float(b @ kb), 0.0) ** 0.5
    return b * (float(kb.sum()) / max(v_norm, NORMALIZE_EPS) ** 2), None


METHOD = Method(ConFIG, weights=weights, torchjd="ConFIG")
