"""The application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import problems
from .middleware import RequestContext
from .routers import combine, meta, ops, weights
from .routers.docs import docs_router
from .runtime import Runtime
from .settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """A ready-to-serve app; the device is resolved and warmed up in its lifespan."""
    settings = settings or Settings()
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="gradweight",
        version="1",
        summary="Combine forget/retain (or multi-task) gradients with MUNBa, Nash and friends.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.router.redirect_slashes = False  # a redirect would be built from the client's Host header
    app.state.runtime = runtime
    app.include_router(combine.router)
    app.include_router(weights.router)
    app.include_router(meta.router)
    app.include_router(ops.router)
    app.include_router(docs_router(app, settings))
    problems.install(app)
    app.add_middleware(RequestContext, metrics=runtime.metrics, settings=settings)
    return app
