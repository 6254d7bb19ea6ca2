"""Fixtures of the client's tests: the fake server (client_fakes.py), both twins behind one face,
recorded backoff on a virtual clock, seeded inputs."""

from __future__ import annotations

import asyncio
import inspect
import zlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
import numpy as np
import pytest
from client_fakes import FakeServer
from gradweight import AsyncClient, Client


class Blocking:
    """An AsyncClient driven through blocking calls (one event loop per call), so that one test body
    checks both twins: `twin(handler)` is a Client or this, by the test's parameter."""

    def __init__(self, inner: AsyncClient) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *a, **kw: asyncio.run(attr(*a, **kw))

    def __enter__(self) -> Blocking:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run(self.inner.aclose())


Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """`twin(handler, **client_kwargs)`: a client of the kind under test, answered by `handler`."""

    def make(handler: Handler, base_url: str = "http://fake", **kw: Any) -> Any:
        if request.param == "sync":
            return Client(base_url, transport=httpx.MockTransport(handler), **kw)
        return Blocking(AsyncClient(base_url, transport=httpx.MockTransport(handler), **kw))

    return make


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record backoff sleeps instead of sleeping (sync and async); the retry deadline's clock advances
    by each recorded sleep, so deadline behaviour is tested without waiting."""
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)

    async def asleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr("gradweight.client._sleep", sleep)
    monkeypatch.setattr("gradweight.client._asleep", asleep)
    monkeypatch.setattr("gradweight.core._clock", lambda: sum(slept))
    return slept


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random inputs per test (seeded from the test's name so failures replay)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
