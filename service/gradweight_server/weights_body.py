"""The POST /v1/weights body -> a `WeightsRequest`: method, group names in gram order, gram and state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gradweight.errors import InvalidGradients, MalformedBody
from gradweight.methods import PAIR, MethodSpec

from .decode import json_object, resolve_method
from .engine import group_order
from .pool import Buffer

FIELDS = frozenset({"method", "gram", "groups", "state"})


@dataclass(frozen=True)
class WeightsRequest:
    spec: MethodSpec
    names: list[str]
    gram: list[list[float]]
    state: Any


def parse_weights_body(buf: Buffer, query_method: str | None) -> WeightsRequest:
    obj = json_object(buf, FIELDS)
    spec = resolve_method(obj.get("method"), query_method)
    names = obj.get("groups", list(PAIR))
    if (
        not isinstance(names, list)
        or not all(isinstance(g, str) for g in names)
        or len(set(names)) != len(names)
    ):
        raise InvalidGradients("`groups` must be a JSON list of distinct group names")
    if "gram" not in obj:
        raise InvalidGradients("no `gram` given")
    if group_order(spec, names) != names:
        raise InvalidGradients(
            f"method {spec.name!r} takes its gram in group order {list(spec.group_names or ())}"
        )
    state = obj.get("state")
    if isinstance(state, str):
        try:
            state = json.loads(state)
        except (ValueError, RecursionError):
            raise MalformedBody("`state` is not valid JSON text") from None
    return WeightsRequest(spec, names, _parse_gram(obj["gram"], len(names)), state if spec.stateful else None)


def _parse_gram(value: Any, k: int) -> list[list[float]]:
    """A k x k list of floats; anything else (bools, huge integers, ragged rows) is invalid-gradients."""
    ok = (
        isinstance(value, list)
        and len(value) == k
        and all(isinstance(row, list) and len(row) == k for row in value)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for row in value for x in row)
    )
    if not ok:
        raise InvalidGradients(f"gram must be a {k} x {k} matrix of numbers, one row per group")
    try:
        return [[float(x) for x in row] for row in value]
    except OverflowError:
        raise InvalidGradients("gram has an entry too large for a float") from None
