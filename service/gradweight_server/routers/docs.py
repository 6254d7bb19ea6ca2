"""/docs, /redoc and /openapi.json, with their scripts served from a package (an offline cluster reaches
no CDN), behind the token when one is set unless `docs_public`."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..deps import require_token
from ..settings import Settings

ASSETS = files("fastapi_offline") / "static"
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


def docs_router(app: FastAPI, settings: Settings) -> APIRouter:
    guard = [] if settings.docs_public else [Depends(require_token)]
    router = APIRouter(dependencies=guard, include_in_schema=False)

    @router.get("/openapi.json")
    @router.head("/openapi.json")
    async def openapi() -> JSONResponse:
        schema: dict[str, Any] = app.openapi()
        return JSONResponse(schema)

    @router.get("/docs")
    @router.head("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @router.get("/redoc")
    @router.head("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )

    @router.get("/docs-assets/{name}")
    @router.head("/docs-assets/{name}")
    async def asset(name: str) -> Response:
        media = ASSET_TYPES.get(name)
        if media is None:
            raise StarletteHTTPException(404)
        return Response(
            (ASSETS / name).read_bytes(), media_type=media, headers={"cache-control": "max-age=86400"}
        )

    return router
