"""OpenAPI descriptions of the binary and hand-parsed bodies, which FastAPI cannot infer."""

from __future__ import annotations

from typing import Any

_PROBLEM = {
    "application/problem+json": {
        "schema": {
            "type": "object",
            "properties": {k: {"type": "string"} for k in ("type", "title", "detail", "code")}
            | {"status": {"type": "integer"}},
        },
        "example": {
            "type": "https://gradweight.dev/problems/invalid-method",
            "title": "Invalid method spec",
            "status": 422,
            "detail": "unknown method 'foo'; known: none, simple, munba, nash",
            "code": "invalid-method",
        },
    }
}
_ERRORS: dict[str, Any] = {
    str(status): {"description": what, "content": _PROBLEM}
    for status, what in (
        (400, "malformed-body"),
        (401, "unauthorized"),
        (403, "forbidden (an Origin not in allowed_origins)"),
        (408, "request-timeout (the request head did not arrive in time)"),
        (413, "payload-too-large"),
        (415, "unsupported-media-type"),
        (421, "misdirected-request (a Host not in allowed_hosts)"),
        (431, "headers-too-large"),
        (422, "invalid-method, invalid-gradients, non-finite or degenerate"),
        (503, "overloaded, not-ready or device-out-of-memory (with Retry-After)"),
    )
}

COMBINE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "One safetensors file: tensors `forget/<key>` and `retain/<key>`; "
                "`__metadata__` may hold `method` (spec as JSON text), `order`, `groups` and `state`.",
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "forget": {"type": "string", "format": "binary"},
                        "retain": {"type": "string", "format": "binary"},
                        "method": {"type": "string", "example": '{"name": "munba"}'},
                        "groups": {"type": "string", "example": '["a", "b", "c"]'},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "method": {"type": "object"},
                        "forget": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                        "retain": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                        "groups": {"type": "object"},
                        "state": {"type": "string"},
                    },
                },
                "example": {
                    "method": {"name": "munba"},
                    "forget": [[1.0, 2.0], [3.0]],
                    "retain": [[0.5, -1.0], [2.0]],
                },
            },
        },
    },
    "responses": {
        "200": {
            "description": "The combined gradient",
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "safetensors: `scaled_grad` (layout=flat) or one tensor per key "
                    "(layout=params); `__metadata__` holds method, weights (absent for elementwise methods), "
                    "gram, device, timing.",
                },
                "application/json": {
                    "example": {
                        "method": {"name": "munba"},
                        "weights": {"retain": 0.61, "forget": 0.42},
                        "gram": [[6.25, 1.5], [1.5, 14.0]],
                        "numel": 3,
                        "dtype": "float64",
                        "norm": 1.41,
                        "device": "cpu",
                        "timing": {"decode_ms": 0.1, "compute_ms": 0.2, "encode_ms": 0.05},
                        "scaled_grad": [0.72, 0.23, 2.48],
                    }
                },
            },
        },
        **_ERRORS,
    },
}

WEIGHTS_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "method": {"type": "object"},
                        "gram": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                        "groups": {"type": "array", "items": {"type": "string"}},
                        "state": {"type": "string"},
                    },
                    "required": ["gram"],
                },
                "example": {"method": {"name": "nash"}, "gram": [[4.0, 1.0], [1.0, 9.0]]},
            }
        },
    },
    "responses": {
        "200": {
            "description": "The weights by group",
            "content": {
                "application/json": {
                    "example": {
                        "method": {"name": "nash", "max_norm": None},
                        "weights": {"retain": 0.4, "forget": 0.3},
                    }
                }
            },
        },
        **_ERRORS,
    },
}
