"""POST /v1/weights: the weights from a gram the trainer computed itself."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ..body import BodyKind
from ..deps import Body, get_record, get_runtime, read_body_of
from ..engine import weights_from_gram
from ..engine.methods import lookup
from ..openapi import WEIGHTS_OPENAPI
from ..record import RequestRecord
from ..weights_body import WeightsRequest, parse_weights_body

router = APIRouter(prefix="/v1", tags=["weights"])
INLINE_BODY = 16 * 1024  # parsed on the event loop: tens of microseconds
INLINE_GROUPS = 16


@router.post(
    "/weights", summary="Weights from a gram", response_class=Response, openapi_extra=WEIGHTS_OPENAPI
)
async def weights(
    request: Request,
    body: Annotated[Body, Depends(read_body_of(frozenset({BodyKind.JSON})))],
    record: Annotated[RequestRecord, Depends(get_record)],
    method: Annotated[str | None, Query(description='Shorthand for {"name": method}')] = None,
) -> Response:
    runtime = get_runtime(request)

    def decode() -> WeightsRequest:
        with body.lease as buf, record.stage("decode"):
            return parse_weights_body(buf, method)

    def answer(req: WeightsRequest) -> bytes:
        record.method = req.spec.name
        with record.stage("compute"):
            w, new_state = weights_from_gram(req.spec, req.gram, req.names, req.state)
        doc: dict[str, Any] = {"method": req.spec.model_dump(mode="json"), "weights": w}
        if new_state is not None:
            doc["state"] = json.dumps(new_state, separators=(",", ":"))
        return json.dumps(doc, separators=(",", ":")).encode()

    if len(body.buffer) > INLINE_BODY:
        content = await runtime.compute(lambda: answer(decode()), nbytes=len(body.buffer))
    else:
        req = decode()  # a few numbers: microseconds on the event loop
        quick = len(req.names) <= INLINE_GROUPS and lookup(req.spec).closed_form
        content = await runtime.compute(lambda: answer(req), nbytes=len(body.buffer), inline=quick)
    return Response(content, media_type="application/json")
