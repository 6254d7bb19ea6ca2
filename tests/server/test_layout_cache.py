"""The header layout cache: a trainer's repeated header is parsed once, and a cached header never vouches
for a body it does not describe."""

from __future__ import annotations

import json

import pytest
import torch
from gradweight.blocks import Packed
from gradweight.errors import MalformedBody
from gradweight.wire import build_header
from gradweight_server.decode import LAYOUTS, Parsed, Span, parse_safetensors
from gradweight_server.views import assemble


def body(n_tensors: int = 300, numel: int = 7, method: str = "munba") -> bytearray:
    entries = [(f"{g}/{i}", "F32", (numel,)) for g in ("forget", "retain") for i in range(n_tensors)]
    header, _ = build_header(entries, {"method": json.dumps({"name": method})})
    data = torch.arange(2 * n_tensors * numel, dtype=torch.float32).numpy().tobytes()
    return bytearray(header + data)


def parse(buf: bytearray) -> Parsed:
    return parse_safetensors(buf, max_header=1 << 20, max_tensors=10_000)


def test_the_same_header_is_parsed_once_and_gives_the_same_spans() -> None:
    a, b = body(), body()
    first, second = parse(a), parse(b)
    assert first.tensors is second.tensors
    assert second.buffer is b
    assert second.method == json.dumps({"name": "munba"})
    other = parse(body(method="simple"))
    assert other.tensors is not first.tensors


@pytest.mark.parametrize("change", [-4, 4])
def test_a_cached_header_on_a_body_of_another_length_is_refused(change: int) -> None:
    good = body(n_tensors=5)
    parse(good)
    bad = good[:change] if change < 0 else good + bytes(change)
    with pytest.raises(MalformedBody):
        parse(bad)


def test_a_cached_header_is_held_to_the_limits_of_the_request() -> None:
    good = body(n_tensors=300)
    parse(good)
    with pytest.raises(MalformedBody, match="tensors"):
        parse_safetensors(good, max_header=1 << 20, max_tensors=100)
    with pytest.raises(MalformedBody, match="header length"):
        parse_safetensors(good, max_header=1000, max_tensors=10_000)


def test_the_cache_is_bounded() -> None:
    for n in range(LAYOUTS.size + 5):
        parse(body(n_tensors=1, numel=n + 1))
    assert len(LAYOUTS._lru) == LAYOUTS.size


def test_a_repeated_header_reuses_the_plan_but_views_its_own_bytes() -> None:
    cpu = torch.device("cpu")
    a, b = body(n_tensors=12, numel=5), body(n_tensors=12, numel=5)
    b[-200:] = bytes(range(200))  # other data, same header
    first = assemble(parse(a), cpu)
    second = parse(b)
    assert second.memo is not None
    assert "plan" in second.memo
    again = assemble(second, cpu)
    assert again.keys == first.keys == [str(i) for i in range(12)]
    assert again.shapes == first.shapes
    for g in ("forget", "retain"):
        for x, y, src in zip(first.groups[g], again.groups[g], second.tensors[g].values()):
            assert isinstance(src, Span)
            assert x.data_ptr() != y.data_ptr()
            assert torch.equal(y, torch.frombuffer(b, dtype=torch.float32)[src.begin // 4 : src.end // 4])


def test_a_client_laid_body_gives_packed_groups_and_another_order_gives_views() -> None:
    cpu = torch.device("cpu")
    buf = body(n_tensors=12, numel=5)
    got = assemble(parse(buf), cpu)
    data = torch.frombuffer(buf, dtype=torch.float32)[-2 * 12 * 5 :]
    for i, g in enumerate(("forget", "retain")):
        group = got.groups[g]
        assert isinstance(group, Packed)
        assert torch.equal(group.flat, data[i * 60 : (i + 1) * 60])
        assert group.flat.data_ptr() == data[i * 60 :].data_ptr()
    entries = [(f"{g}/{i}", "F32", (5,)) for g in ("forget", "retain") for i in reversed(range(12))]
    header, _ = build_header(entries, {"method": json.dumps({"name": "munba"})})
    reordered = bytearray(header + bytes(2 * 12 * 5 * 4))
    views = assemble(parse(reordered), cpu)
    assert not isinstance(views.groups["forget"], Packed)
    assert views.keys == [str(i) for i in range(12)]
