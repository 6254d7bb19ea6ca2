"""Discovery: /v1/methods and /v1/info (behind the token when one is set)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request

from ..deps import get_runtime, require_token
from ..engine.methods import REGISTRY, availability

router = APIRouter(prefix="/v1", tags=["meta"], dependencies=[Depends(require_token)])


def _version() -> str:
    try:
        return version("gradweight-server")
    except PackageNotFoundError:
        return "unknown"


@router.get("/methods")
@router.head("/methods", include_in_schema=False)
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


@router.get("/info")
@router.head("/info", include_in_schema=False)
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
