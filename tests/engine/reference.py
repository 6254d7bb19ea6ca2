"""Float64 references: the seed's three formulas written again as its source writes them; input makers."""

from __future__ import annotations

import math

import torch


def cat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)


def seed_none(forget: list[torch.Tensor], retain: list[torch.Tensor]) -> torch.Tensor:
    return cat(forget)


def seed_simple(forget: list[torch.Tensor], retain: list[torch.Tensor], fw: float, rw: float) -> torch.Tensor:
    return fw * cat(forget) + rw * cat(retain)


def seed_munba_weights(forget: list[torch.Tensor], retain: list[torch.Tensor]) -> torch.Tensor:
    g = torch.stack([cat(retain), cat(forget)])
    k = g @ g.T
    k11, k12, k22 = k[0, 0], k[0, 1], k[1, 1]
    alpha_retain = torch.sqrt((2 * k11 * k22 + k12 * torch.sqrt(k11 * k22)) / (k11**2 * k22 - k11 * k12**2))
    alpha_forget = (1 - k11 * alpha_retain**2) / (k12 * alpha_retain)
    return torch.stack([alpha_retain, alpha_forget])


def seed_munba(forget: list[torch.Tensor], retain: list[torch.Tensor]) -> torch.Tensor:
    g = torch.stack([cat(retain), cat(forget)])
    return (g.T @ seed_munba_weights(forget, retain).reshape(2, 1)).reshape(-1)


def random_shapes(n: int, gen: torch.Generator, max_dim: int = 24) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for _ in range(n):
        rank = int(torch.randint(0, 4, (1,), generator=gen))
        shapes.append(tuple(int(d) for d in torch.randint(1, max_dim, (rank,), generator=gen)))
    return shapes


def split(flat: torch.Tensor, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[offset : offset + n].reshape(s).to(dtype).clone())
        offset += n
    return out


def pair(
    shapes: list[tuple[int, ...]],
    cos: float,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    scale_r: float = 1.0,
    scale_f: float = 1.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(forget, retain) lists with the given shapes whose flattened cosine is `cos` (before rounding)."""
    n = sum(math.prod(s) for s in shapes)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    r /= r.norm()
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    z -= (z @ r) * r
    z /= z.norm()
    f = cos * r + math.sqrt(max(0.0, 1 - cos * cos)) * z
    return split(f * scale_f, shapes, dtype), split(r * scale_r, shapes, dtype)


def gram64(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    g = torch.stack([cat(t) for t in groups])
    return g @ g.T
