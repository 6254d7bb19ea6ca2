"""The weighting engine: gram -> weights (one file per method) kept apart from the two tensor passes."""

from .core import Outcome, group_order, order_groups, run
from .device import resolve_device
from .weights import check_gram, weights_from_gram

__all__ = [
    "Outcome",
    "check_gram",
    "group_order",
    "order_groups",
    "resolve_device",
    "run",
    "weights_from_gram",
]
