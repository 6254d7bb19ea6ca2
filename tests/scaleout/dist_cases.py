"""The cases the distributed tests run, shared by the test process (references) and the gloo workers.

Every rank builds the same gradients from the same seed; a sharded rank keeps its slice of each tensor
(the flattened tensor split in `world` nearly equal parts, as FSDP's flat parameters are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SHAPES = ((37, 5), (101,), (13, 3), (2, 2, 2))
STEPS = 2


@dataclass(frozen=True)
class Case:
    name: str
    method: dict[str, Any]
    k: int  # 2: the forget/retain pair, else `groups=` with k tasks

    def names(self) -> list[str]:
        return ["retain", "forget"] if self.k == 2 else [f"task{i}" for i in range(self.k)]

    def grads(self, step: int) -> dict[str, list[torch.Tensor]]:
        """Step `step`'s full gradients, one list of tensors per group, never collinear."""
        gen = torch.Generator().manual_seed(1000 * self.k + step)
        base = [torch.randn(s, generator=gen) for s in SHAPES]
        out = {}
        for i, name in enumerate(self.names()):
            out[name] = [(torch.randn(s, generator=gen) + (0.5 - 0.2 * i) * b) for s, b in zip(SHAPES, base)]
        return out


CASES = (
    Case("pair-munba", {"name": "munba"}, 2),
    Case("tasks5-gradvac", {"name": "gradvac", "seed": 7, "beta": 0.3}, 5),
)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.reshape(-1).tensor_split(world)[rank]


def call_args(case: Case, grads: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    if case.k == 2:
        return {"forget": grads["forget"], "retain": grads["retain"]}
    return {"groups": grads}
