"""POST /v1/combine: gradients in, the weighted combination out (decode -> engine -> encode)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ..body import BodyKind
from ..decode import parse_body, resolve_method
from ..deps import Body, get_record, get_runtime, read_body_of
from ..encode import json_reply, plan_octet, reply_metadata
from ..engine import run
from ..openapi import COMBINE_OPENAPI
from ..record import RequestRecord
from ..runtime import Runtime
from ..views import assemble

router = APIRouter(prefix="/v1", tags=["combine"])

OutDtype = Literal["float16", "bfloat16", "float32", "float64"]
JSON_TEXT_HELD = 32  # bytes of Python objects per byte of JSON text, at worst (see body.HELD_PER_JSON_BYTE)


def wants_json(accept: str) -> bool:
    """JSON only when the client prefers it over octet-stream (the default for */* or no Accept)."""
    best: dict[str, float] = {}
    for item in accept.split(","):
        mt, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        best[mt.lower()] = max(q, best.get(mt.lower(), 0.0))
    j = best.get("application/json", 0.0)
    o = max(best.get("application/octet-stream", 0.0), best.get("*/*", 0.0) * 0.999)
    return j > 0 and j > o


@dataclass(frozen=True)
class CombineQuery:
    method: str | None
    layout: Literal["flat", "params"]
    dtype: torch.dtype | None
    as_json: bool


def combine_query(
    request: Request,
    method: Annotated[str | None, Query(description='Shorthand for {"name": method}')] = None,
    layout: Annotated[
        Literal["flat", "params"], Query(description="One flat vector or one tensor per key")
    ] = "flat",
    dtype: Annotated[OutDtype | None, Query(description="The result's dtype (default: the inputs')")] = None,
) -> CombineQuery:
    as_json = wants_json(request.headers.get("accept", ""))
    return CombineQuery(method, layout, getattr(torch, dtype) if dtype else None, as_json)


@router.post(
    "/combine",
    summary="Combine forget/retain (or any groups') gradients with a method's weights",
    response_class=Response,
    openapi_extra=COMBINE_OPENAPI,
)
async def combine(
    request: Request,
    body: Annotated[Body, Depends(read_body_of(frozenset(BodyKind)))],
    query: Annotated[CombineQuery, Depends(combine_query)],
    record: Annotated[RequestRecord, Depends(get_record)],
) -> Response:
    runtime = get_runtime(request)
    content, media = await runtime.compute(lambda: _combine(runtime, body, query, record))
    return Response(content, media_type=media)


def _combine(
    runtime: Runtime, body: Body, query: CombineQuery, record: RequestRecord
) -> tuple[bytes | memoryview, str]:
    """Decode, run, encode; the reservation follows what is held: body, parse temporaries, then the reply."""
    settings, device, reservation = runtime.settings, runtime.device, record.reservation
    assert device is not None
    assert reservation is not None
    size = len(body.buffer)
    text = 0

    def hold(nbytes: int) -> None:
        nonlocal text
        text += nbytes
        reservation.resize(max(reservation.nbytes, size + JSON_TEXT_HELD * text))

    with record.stage("decode"):
        parsed = parse_body(
            body.info,
            body.buffer,
            max_header=settings.max_header_bytes,
            max_tensors=settings.max_tensors,
            hold=hold,
        )
        spec = resolve_method(parsed.method, query.method)
        record.method = spec.name
        data = assemble(parsed, device)
    state = parsed.state if spec.stateful else None
    dtype = query.dtype or data.dtype
    spec_dict = spec.model_dump(mode="json")
    if query.as_json:
        reservation.resize(size + data.numel * dtype.itemsize)
        with record.stage("compute"):
            outcome = run(spec, data.groups, keys=data.keys, out_dtype=dtype, state=state)
            _sync(device)
        doc = json_reply(
            method=spec_dict,
            weights=outcome.weights,
            gram=outcome.gram,
            flat=outcome.flat,
            device=str(device),
            timing=record.timing(),
            state=outcome.state,
            max_elements=settings.json_max_elements,
        )
        return json.dumps(doc, separators=(",", ":")).encode(), "application/json"
    with record.stage("encode"):
        plan = plan_octet(
            data.keys,
            data.shapes,
            data.numel,
            dtype,
            layout=query.layout,
            n_groups=len(data.groups),
            spec_json=json.dumps(spec_dict),
            state_chars=len(json.dumps(state)) if spec.stateful else None,
            lease=lambda n: record.hold(runtime.pool.lease(n)),
        )
    reservation.resize(size + len(plan.buffer))
    out = plan.out(dtype, data.numel) if device.type == "cpu" else None
    with record.stage("compute"):
        outcome = run(spec, data.groups, keys=data.keys, out=out, out_dtype=dtype, state=state)
        _sync(device)
    with record.stage("encode"):
        if out is None:
            plan.out(dtype, data.numel).copy_(outcome.flat)
    del data, parsed, out
    body.lease.close()
    meta = reply_metadata(
        spec_dict, outcome.weights, outcome.gram, str(device), record.timing(), outcome.state
    )
    reply = plan.finish(meta)
    reservation.resize(len(reply))
    return reply, "application/octet-stream"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
