"""`gradweight-server`: uvicorn (uvloop + httptools) serving `create_app`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .connection import protocol_for
from .settings import Settings


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn serving `app` over uvloop and the guarded httptools protocol (`connection.py`)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": protocol_for(settings),
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
    }
    return uvicorn.Config(app, **(options | overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="gradweight-server", description="Serve gradweight (settings also from GRADWEIGHT_* variables)."
    )
    parser.add_argument("--host", help="bind address (GRADWEIGHT_HOST)")
    parser.add_argument("--port", type=int, help="port (GRADWEIGHT_PORT)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (GRADWEIGHT_DEVICE)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.Server(server_config(create_app(settings), settings)).run()


if __name__ == "__main__":
    main()
