"""POST /v1/combine: gradients in, the weighted combination out (decode -> engine -> encode)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from gradweight.methods import MethodSpec

from ..body import SMALL_TEXT, BodyKind
from ..decode import parse_body, resolve_method
from ..deps import Body, get_record, get_runtime, read_body_of
from ..encode import json_reply, plan_octet, reply_metadata
from ..engine import run
from ..openapi import COMBINE_OPENAPI
from ..record import RequestRecord
from ..runtime import Runtime
from ..views import Assembled, assemble

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


async def combine_query(
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
    content, media = await runtime.compute(
        lambda: _combine(runtime, body, query, record), nbytes=len(body.buffer)
    )
    return Response(content, media_type=media)


@dataclass
class _Step:
    """A decoded request, ready for the engine."""

    spec: MethodSpec
    data: Assembled
    state: Any
    dtype: torch.dtype


def _combine(
    runtime: Runtime, body: Body, query: CombineQuery, record: RequestRecord
) -> tuple[bytes | memoryview, str]:
    """Decode, run, encode; the reservation follows what is held: body, parse temporaries, then the reply."""
    step = _decode(runtime, body, query, record)
    if query.as_json:
        return _json(runtime, body, step, record), "application/json"
    return _octet(runtime, body, step, query, record), "application/octet-stream"


def _decode(runtime: Runtime, body: Body, query: CombineQuery, record: RequestRecord) -> _Step:
    settings, reservation = runtime.settings, record.reservation
    assert runtime.device is not None
    assert reservation is not None
    size = len(body.buffer)
    text = 0

    def hold(nbytes: int) -> None:
        nonlocal text
        text += nbytes
        reservation.resize(max(reservation.nbytes, size + JSON_TEXT_HELD * max(0, text - SMALL_TEXT)))

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
        data = assemble(parsed, runtime.device)
    return _Step(spec, data, parsed.state if spec.stateful else None, query.dtype or data.dtype)


def _json(runtime: Runtime, body: Body, step: _Step, record: RequestRecord) -> bytes:
    device, data = runtime.device, step.data
    assert device is not None
    assert record.reservation is not None
    # The body, the float64 tensors parsed from a JSON body, and the result.
    parsed = data.numel * len(data.groups) * 8 if body.info.kind is BodyKind.JSON else 0
    record.reservation.resize(len(body.buffer) + parsed + data.numel * step.dtype.itemsize)
    with record.stage("compute"):
        outcome = run(
            step.spec,
            data.groups,
            keys=data.keys,
            out_dtype=step.dtype,
            state=step.state,
            threads=runtime.threads_for(len(body.buffer)),
        )
        _sync(device)
    doc = json_reply(
        method=step.spec.model_dump(mode="json"),
        weights=outcome.weights,
        gram=outcome.gram,
        flat=outcome.flat,
        device=str(device),
        timing=record.timing(),
        state=outcome.state,
        max_elements=runtime.settings.json_max_elements,
    )
    return json.dumps(doc, separators=(",", ":")).encode()


def _octet(
    runtime: Runtime, body: Body, step: _Step, query: CombineQuery, record: RequestRecord
) -> memoryview:
    """The result computed straight into the leased reply buffer (on CPU), then the header written."""
    device, data, dtype = runtime.device, step.data, step.dtype
    assert device is not None
    assert record.reservation is not None
    spec_dict = step.spec.model_dump(mode="json")
    with record.stage("encode"):
        plan = plan_octet(
            data.keys,
            data.shapes,
            data.numel,
            dtype,
            layout=query.layout,
            n_groups=len(data.groups),
            spec_json=json.dumps(spec_dict),
            state_chars=len(json.dumps(step.state)) if step.spec.stateful else None,
            lease=lambda n: record.hold(runtime.pool.lease(n)),
        )
    record.reservation.resize(len(body.buffer) + len(plan.buffer))
    out = plan.out(dtype, data.numel) if device.type == "cpu" else None
    with record.stage("compute"):
        outcome = run(
            step.spec,
            data.groups,
            keys=data.keys,
            out=out,
            out_dtype=dtype,
            state=step.state,
            threads=runtime.threads_for(len(body.buffer)),
        )
        _sync(device)
    with record.stage("encode"):
        if out is None:
            plan.out(dtype, data.numel).copy_(outcome.flat)
    del step.data, data, out
    body.lease.close()  # the views of the body are gone: its buffer can serve the next request
    meta = reply_metadata(
        spec_dict, outcome.weights, outcome.gram, str(device), record.timing(), outcome.state
    )
    reply = plan.finish(meta)
    record.reservation.resize(len(reply))
    return reply


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
