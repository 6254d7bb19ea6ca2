"""Prometheus metrics, one registry per app so several apps (tests) can live in one process."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BYTES = tuple(float(4**i) for i in range(4, 17))
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Everything /metrics exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gradweight_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_bytes = Histogram(
            "gradweight_request_bytes", "Request body bytes", ["route"], buckets=_BYTES, registry=r
        )
        self.response_bytes = Histogram(
            "gradweight_response_bytes", "Response body bytes", ["route"], buckets=_BYTES, registry=r
        )
        self.stage_seconds = Histogram(
            "gradweight_stage_seconds",
            "Seconds spent decoding, computing and encoding, by method",
            ["stage", "method"],
            buckets=_SECONDS,
            registry=r,
        )
        self.inflight_requests = Gauge(
            "gradweight_inflight_requests", "Admitted combine/weights requests in flight", registry=r
        )
        self.inflight_bytes = Gauge("gradweight_inflight_bytes", "Request body bytes held", registry=r)
        self.device_memory = Gauge(
            "gradweight_device_memory_bytes", "CUDA memory by kind", ["kind"], registry=r
        )

    def render(self, device: torch.device | None, inflight_requests: int, inflight_bytes: int) -> bytes:
        self.inflight_requests.set(inflight_requests)
        self.inflight_bytes.set(inflight_bytes)
        if device is not None and device.type == "cuda":
            self.device_memory.labels("allocated").set(torch.cuda.memory_allocated(device))
            self.device_memory.labels("reserved").set(torch.cuda.memory_reserved(device))
            self.device_memory.labels("peak_allocated").set(torch.cuda.max_memory_allocated(device))
        out: bytes = generate_latest(self.registry)
        return out
