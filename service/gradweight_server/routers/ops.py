"""Operations, open without the token: /healthz, /readyz, /metrics (GET and HEAD, for probes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import check_ready, get_runtime

router = APIRouter(tags=["ops"])


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> dict[str, str]:
    check_ready(request)
    return {"status": "ready", "device": str(get_runtime(request).device)}


@router.get("/metrics", response_class=Response)
@router.head("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request) -> Response:
    runtime = get_runtime(request)
    adm = runtime.admission
    body = runtime.metrics.render(runtime.device, adm.requests, adm.bytes)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
