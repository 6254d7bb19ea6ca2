"""The header layout cache: a trainer's repeated header is parsed once, and a cached header never vouches
for a body it does not describe."""

from __future__ import annotations

import json

import pytest
import torch
from gradweight.errors import MalformedBody
from gradweight.wire import build_header
from gradweight_server.decode import LAYOUTS, parse_safetensors


def body(n_tensors: int = 300, numel: int = 7, method: str = "munba") -> bytearray:
    entries = [(f"{g}/{i}", "F32", (numel,)) for g in ("forget", "retain") for i in range(n_tensors)]
    header, _ = build_header(entries, {"method": json.dumps({"name": method})})
    data = torch.arange(2 * n_tensors * numel, dtype=torch.float32).numpy().tobytes()
    return bytearray(header + data)


def parse(buf: bytearray) -> object:
    return parse_safetensors(buf, max_header=1 << 20, max_tensors=10_000)


def test_the_same_header_is_parsed_once_and_gives_the_same_spans() -> None:
    a, b = body(), body()
    first, second = parse(a), parse(b)
    assert first.tensors is second.tensors  # type: ignore[attr-defined]
    assert second.buffer is b  # type: ignore[attr-defined]
    assert second.method == json.dumps({"name": "munba"})  # type: ignore[attr-defined]
    other = parse(body(method="simple"))
    assert other.tensors is not first.tensors  # type: ignore[attr-defined]


@pytest.mark.parametrize("change", [-4, 4])
def test_a_cached_header_on_a_body_of_another_length_is_refused(change: int) -> None:
    good = body(n_tensors=5)
    parse(good)
    bad = good[:change] if change < 0 else good + bytes(change)
    with pytest.raises(MalformedBody):
        parse(bad)


def test_the_cache_is_bounded() -> None:
    for n in range(LAYOUTS.size + 5):
        parse(body(n_tensors=1, numel=n + 1))
    assert len(LAYOUTS._lru) == LAYOUTS.size
