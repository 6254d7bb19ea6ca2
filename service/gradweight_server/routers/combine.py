"""POST /v1/combine: gradients in, the weighted combination out."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from gradweight.errors import DeviceOutOfMemory
from gradweight.methods import filled
from starlette.background import BackgroundTask

from ..admission import Ticket
from ..body import ClientGone, read_body
from ..decode import assemble, parse_body, resolve_method
from ..deps import admit_body, get_runtime
from ..encode import json_reply, plan_octet, reply_metadata
from ..engine import run
from ..openapi import COMBINE_OPENAPI
from ..runtime import Runtime

router = APIRouter(prefix="/v1", tags=["combine"])

OutDtype = Literal["float16", "bfloat16", "float32", "float64"]


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


@router.post(
    "/combine",
    summary="Combine forget/retain (or any groups') gradients with a method's weights",
    response_class=Response,
    openapi_extra=COMBINE_OPENAPI,
)
async def combine(
    request: Request,
    ticket: Annotated[Ticket, Depends(admit_body)],
    method: Annotated[str | None, Query(description='Shorthand for {"name": method}')] = None,
    layout: Annotated[
        Literal["flat", "params"], Query(description="One flat vector or one tensor per key")
    ] = "flat",
    dtype: Annotated[OutDtype | None, Query(description="The result's dtype (default: the inputs')")] = None,
) -> Response:
    runtime = get_runtime(request)
    ctx: dict[str, Any] = request.scope["gw"]
    try:
        buf = await read_body(
            request, ticket, runtime.pool, runtime.settings.body_timeout_s, runtime.settings.body_min_rate
        )
    except ClientGone:
        ctx["error"] = "client-disconnected"
        return Response(status_code=499)
    as_json = wants_json(request.headers.get("accept", ""))
    out_dtype = getattr(torch, dtype) if dtype else None

    def job() -> tuple[bytes | memoryview, str]:
        try:
            return _combine(runtime, ticket, buf, method, layout, out_dtype, as_json, ctx)
        except torch.OutOfMemoryError:
            if runtime.device is not None and runtime.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory("the device ran out of memory for this request") from None
        except MemoryError:
            raise DeviceOutOfMemory("the server ran out of memory for this request") from None

    try:
        body, media = await runtime.in_worker(job)
    finally:
        if ticket.declared is not None:
            runtime.pool.give(buf)
    if isinstance(body, memoryview) and isinstance(body.obj, bytearray):
        return Response(body, media_type=media, background=BackgroundTask(runtime.pool.give, body.obj))
    return Response(body, media_type=media)


def _combine(
    runtime: Runtime,
    ticket: Ticket,
    buf: bytearray,
    query_method: str | None,
    layout: str,
    out_dtype: torch.dtype | None,
    as_json: bool,
    ctx: dict[str, Any],
) -> tuple[bytes | memoryview, str]:
    settings = runtime.settings
    device = runtime.device
    assert device is not None
    t0 = time.perf_counter()
    parsed = parse_body(
        ticket.kind,
        ticket.content_type,
        buf,
        max_header=settings.max_header_bytes,
        max_tensors=settings.max_tensors,
    )
    spec = resolve_method(parsed.method, query_method)
    ctx["method"] = spec.name
    state = parsed.state if spec.stateful else None
    data = assemble(parsed, device)
    dtype = out_dtype or data.dtype
    spec_dict = filled(spec)
    t1 = time.perf_counter()
    if as_json:
        outcome = run(spec, data.groups, keys=data.keys, out_dtype=dtype, state=state)
        _sync(device)
        t2 = time.perf_counter()
        timing = _timing(t1 - t0, t2 - t1, time.perf_counter() - t2)
        doc = json_reply(
            method=spec_dict,
            weights=outcome.weights,
            gram=outcome.gram,
            flat=outcome.flat,
            device=str(device),
            timing=timing,
            state=outcome.state,
            max_elements=settings.json_max_elements,
        )
        _observe(runtime, ctx, spec.name, timing)
        return json.dumps(doc, separators=(",", ":")).encode(), "application/json"
    plan = plan_octet(
        data.keys,
        data.shapes,
        data.numel,
        dtype,
        layout=layout,
        n_groups=len(data.groups),
        spec_json=json.dumps(spec_dict),
        state_chars=len(json.dumps(state)) if spec.stateful else None,
        alloc=runtime.pool.take,
    )
    t_plan = time.perf_counter()
    out = plan.out(dtype, data.numel) if device.type == "cpu" else None
    try:
        outcome = run(spec, data.groups, keys=data.keys, out=out, out_dtype=dtype, state=state)
        _sync(device)
    except BaseException:
        del out
        runtime.pool.give(plan.buffer)
        raise
    t2 = time.perf_counter()
    if out is None:
        plan.out(dtype, data.numel).copy_(outcome.flat)
    del data, parsed
    timing = _timing(t1 - t0, t2 - t_plan, time.perf_counter() - t2 + t_plan - t1)
    meta = reply_metadata(spec_dict, outcome.weights, outcome.gram, str(device), timing, outcome.state)
    _observe(runtime, ctx, spec.name, timing)
    reply = plan.finish(meta)
    if reply.obj is not plan.buffer:
        runtime.pool.give(plan.buffer)
    return reply, "application/octet-stream"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timing(decode_s: float, compute_s: float, encode_s: float) -> dict[str, float]:
    """Stage durations; allocating and writing the reply buffer counts as encoding."""
    return {
        "decode_ms": round(decode_s * 1000, 3),
        "compute_ms": round(compute_s * 1000, 3),
        "encode_ms": round(encode_s * 1000, 3),
    }


def _observe(runtime: Runtime, ctx: dict[str, Any], method: str, timing: dict[str, float]) -> None:
    ctx.update(timing)
    for stage in ("decode", "compute", "encode"):
        runtime.metrics.stage_seconds.labels(stage, method).observe(timing[f"{stage}_ms"] / 1000)
