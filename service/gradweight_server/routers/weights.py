"""POST /v1/weights: the weights from a gram the trainer computed itself."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from gradweight.errors import InvalidGradients, MalformedBody
from gradweight.methods import PAIR, filled

from ..admission import Ticket
from ..body import ClientGone, read_body
from ..decode import json_object, resolve_method
from ..deps import admit_body, get_runtime
from ..engine import order_groups, weights_from_gram
from ..openapi import WEIGHTS_OPENAPI

router = APIRouter(prefix="/v1", tags=["weights"])
FIELDS = frozenset({"method", "gram", "groups", "state"})


@router.post(
    "/weights", summary="Weights from a gram", response_class=Response, openapi_extra=WEIGHTS_OPENAPI
)
async def weights(
    request: Request,
    ticket: Annotated[Ticket, Depends(admit_body)],
    method: Annotated[str | None, Query(description='Shorthand for {"name": method}')] = None,
) -> Response:
    runtime = get_runtime(request)
    try:
        buf = await read_body(
            request, ticket, runtime.pool, runtime.settings.body_timeout_s, runtime.settings.body_min_rate
        )
    except ClientGone:
        return Response(status_code=499)
    ctx: dict[str, Any] = request.scope["gw"]

    def job() -> bytes:
        obj = json_object(buf, FIELDS)
        spec = resolve_method(obj.get("method"), method)
        ctx["method"] = spec.name
        names = obj.get("groups", list(PAIR))
        if (
            not isinstance(names, list)
            or not all(isinstance(g, str) for g in names)
            or len(set(names)) != len(names)
        ):
            raise InvalidGradients("`groups` must be a JSON list of distinct group names")
        if "gram" not in obj:
            raise InvalidGradients("no `gram` given")
        placeholder: dict[str, list[Any]] = {g: [] for g in names}
        if list(order_groups(spec, placeholder)) != names:
            raise InvalidGradients(
                f"method {spec.name!r} takes its gram in group order {list(spec.group_names or ())}"
            )
        state = obj.get("state")
        if isinstance(state, str):
            try:
                state = json.loads(state)
            except (ValueError, RecursionError):
                raise MalformedBody("`state` is not valid JSON text") from None
        gram = _gram(obj["gram"], len(names))
        w, new_state = weights_from_gram(spec, gram, names, state if spec.stateful else None)
        doc: dict[str, Any] = {"method": filled(spec), "weights": w}
        if new_state is not None:
            doc["state"] = json.dumps(new_state, separators=(",", ":"))
        return json.dumps(doc, separators=(",", ":")).encode()

    return Response(await runtime.in_worker(job), media_type="application/json")


def _gram(value: Any, k: int) -> list[list[float]]:
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
