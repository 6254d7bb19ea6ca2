"""Fixtures of the client's tests: the fake server (client_fakes.py), recorded backoff, seeded inputs."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from client_fakes import FakeServer


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record backoff sleeps instead of sleeping (sync and async)."""
    slept: list[float] = []

    async def asleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr("gradweight.client._sleep", slept.append)
    monkeypatch.setattr("gradweight.client._asleep", asleep)
    return slept


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random inputs per test (seeded from the test's name so failures replay)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
