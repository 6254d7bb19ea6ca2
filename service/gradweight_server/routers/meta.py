"""Discovery and operations: /v1/methods, /v1/info, /healthz, /readyz, /metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from gradweight.errors import NotReady
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import get_runtime, require_token
from ..engine.methods import REGISTRY, availability

router = APIRouter()


def _version() -> str:
    try:
        return version("gradweight-server")
    except PackageNotFoundError:
        return "unknown"


@router.get("/v1/methods", tags=["meta"], dependencies=[Depends(require_token)])
async def methods() -> list[dict[str, Any]]:
    """Every method with its options as JSON Schema, so clients can validate before sending."""
    out = []
    for name, method in REGISTRY.items():
        cls = method.spec
        available, reason = availability(cls)
        out.append(
            {
                "name": name,
                "summary": cls.summary,
                "reference": cls.reference,
                "options": cls.model_json_schema(),
                "needs_gram": cls.needs_gram,
                "gives_weights": cls.gives_weights,
                "groups": cls.groups_info(),
                "stateful": cls.stateful,
                "guarantee": cls.guarantee,
                "requires": method.extra,
                "torchjd": method.torchjd,
                "available": available,
                "unavailable_reason": reason,
            }
        )
    return out


@router.get("/v1/info", tags=["meta"], dependencies=[Depends(require_token)])
async def info(request: Request) -> dict[str, Any]:
    runtime = get_runtime(request)
    device = runtime.device
    doc: dict[str, Any] = {
        "version": _version(),
        "device": str(device) if device is not None else None,
        "torch": torch.__version__,
        "ready": runtime.ready,
        "limits": runtime.settings.limits(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        doc["cuda"] = {
            "name": props.name,
            "total_memory": props.total_memory,
            "allocated": torch.cuda.memory_allocated(device),
        }
    return doc


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(request: Request) -> dict[str, str]:
    runtime = get_runtime(request)
    if not runtime.ready:
        raise NotReady("the device is still warming up", retry_after=runtime.settings.retry_after_s)
    return {"status": "ready", "device": str(runtime.device)}


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(request: Request) -> Response:
    runtime = get_runtime(request)
    adm = runtime.admission
    body = runtime.metrics.render(runtime.device, adm.requests, adm.bytes)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
