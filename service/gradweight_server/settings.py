"""Every server setting in one place, read from `GRADWEIGHT_*` environment variables."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    """Server configuration; `GRADWEIGHT_<FIELD>` overrides each field (e.g. `GRADWEIGHT_MAX_BODY_BYTES`)."""

    model_config = SettingsConfigDict(env_prefix="GRADWEIGHT_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address `gradweight-server` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `gradweight-server` listens on.")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    token: SecretStr | None = Field(
        None, description="Bearer token required on /v1/*; unset means no authentication."
    )
    max_body_bytes: int = Field(2 * GiB, gt=0, description="Largest request body; larger gets 413.")
    max_json_body_bytes: int = Field(
        16 * MiB, gt=0, description="Largest application/json combine body (JSON is for tiny inputs)."
    )
    max_header_bytes: int = Field(16 * MiB, gt=0, description="Largest safetensors JSON header.")
    max_tensors: int = Field(65_536, gt=0, description="Most tensors in one request, all groups together.")
    max_concurrency: int = Field(2, gt=0, description="Most combine/weights requests in flight at once.")
    max_inflight_bytes: int = Field(
        4 * GiB, gt=0, description="Most bytes held at once over all requests: bodies, replies, temporaries."
    )
    json_max_elements: int = Field(
        65_536, ge=0, description="Largest result returned as a JSON list; `scaled_grad` is null beyond."
    )
    buffer_pool_bytes: int = Field(
        1 * GiB,
        ge=0,
        description="Idle request and reply buffers kept for same-size requests (0 disables).",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="A body that sends no byte for this long is dropped and its bytes freed."
    )
    body_min_rate: int = Field(
        1 * MiB,
        ge=1,
        description="A body must arrive within body_timeout_s plus its size at this many bytes/s.",
    )
    send_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A reply must be taken within this plus its size at send_min_rate, or dropped.",
    )
    send_min_rate: int = Field(1 * MiB, ge=1, description="Bytes/s a client must read a reply at, at least.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must send a whole header block within this (408/close)."
    )
    max_http_header_bytes: int = Field(64 * 1024, gt=0, description="Largest HTTP header block; beyond, 431.")
    max_http_headers: int = Field(100, gt=0, description="Most HTTP headers in one request; beyond, 431.")
    max_connections: int = Field(
        1024, gt=0, description="Most open connections; past it the oldest idle one is closed."
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["*"], description="Host header values served (`*` any); others get 400."
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="Origins whose cross-site requests are served; others get 403."
    )
    docs_public: bool = Field(False, description="Serve /docs, /redoc, /openapi.json without the token.")
    shutdown_timeout_s: int = Field(
        30, ge=0, description="On SIGTERM, in-flight requests get this long before connections are closed."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 overloaded/not-ready.")
    warmup: bool = Field(True, description="Run a small combine at start-up before /readyz answers 200.")
    log_level: str = Field("info", description="Log level of the `gradweight_server` logger and uvicorn.")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_body_bytes * 3 // 2 > self.max_inflight_bytes:
            raise ValueError(
                "max_inflight_bytes must be at least 1.5 x max_body_bytes (a body and its reply, at once)"
            )
        return self

    def limits(self) -> dict[str, Any]:
        """The limits in force, as /v1/info reports them."""
        return {
            name: getattr(self, name)
            for name in (
                "max_body_bytes",
                "max_json_body_bytes",
                "max_header_bytes",
                "max_tensors",
                "max_concurrency",
                "max_inflight_bytes",
                "json_max_elements",
            )
        }
