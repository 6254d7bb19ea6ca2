"""One file per method, as torchjd's `aggregation/`: each public module declares `METHOD` (`_method.Method`).

Most map the gram (float64, CPU) to one weight per group and leave the gradients to the shared passes in
`engine.passes`; the elementwise ones (`trimmed_mean`, `graddrop`) write their result themselves through
`engine.elementwise`. `_registry` collects the files, `_solve` holds the one failure policy.
"""

from ._method import AggregateFn, Method, WeightFn
from ._registry import REGISTRY, availability, lookup, require, warm_up
from ._solve import aggregate, solve

__all__ = [
    "REGISTRY",
    "AggregateFn",
    "Method",
    "WeightFn",
    "aggregate",
    "availability",
    "lookup",
    "require",
    "solve",
    "warm_up",
]
