"""Request bodies decode, with the strict wire parser, to exactly the tensors and metadata given."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gradweight import wire
from gradweight.encoding import Body, combine_body
from gradweight.tensors import CHUNK_BYTES, Buffer, as_group, host_bytes


def _decode(body: Body) -> tuple[wire.Header, bytes]:
    data = b"".join(bytes(c) for c in body)
    assert len(data) == body.length
    assert data == body.to_bytes()
    return wire.parse(data), data


def test_list_inputs_numeric_keys_no_order(rng: np.random.Generator) -> None:
    f = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    r = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    body = combine_body({"forget": as_group(f, "f"), "retain": as_group(r, "r")}, method={"name": "munba"})
    header, data = _decode(body)
    assert json.loads(header.metadata["method"]) == {"name": "munba"}
    assert "order" not in header.metadata
    assert "groups" not in header.metadata
    by_name = {t.name: t for t in header.tensors}
    assert set(by_name) == {"forget/0", "forget/1", "retain/0", "retain/1"}
    t = by_name["retain/0"]
    assert t.dtype == "F32"
    assert t.shape == (3, 4)
    got = np.frombuffer(data, np.float32, t.numel, t.begin).reshape(t.shape)
    np.testing.assert_array_equal(got, r[0])
    assert header.data_start % 8 == 0


def test_dict_inputs_send_order_and_state() -> None:
    g = {"enc.w": torch.randn(4, 2), "enc.b": torch.randn(4), "head.w": torch.randn(1, 4)}
    body = combine_body(
        {"forget": as_group(g, "f"), "retain": as_group(g, "r")}, method={"name": "nash"}, state='{"s":1}'
    )
    header, _ = _decode(body)
    assert json.loads(header.metadata["order"]) == ["enc.w", "enc.b", "head.w"]
    assert header.metadata["state"] == '{"s":1}'


def test_named_pairs_are_a_mapping() -> None:
    g = as_group(((n, torch.randn(2)) for n in ["b", "a"]), "g")
    assert g.keys == ["b", "a"]
    assert g.named


def test_multi_groups_metadata() -> None:
    gs = {f"task_{i}": [torch.randn(7)] for i in range(3)}
    body = combine_body({k: as_group(v, k) for k, v in gs.items()}, method={"name": "nash"})
    header, _ = _decode(body)
    assert json.loads(header.metadata["groups"]) == ["task_0", "task_1", "task_2"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtypes_and_noncontiguous(dtype: torch.dtype) -> None:
    a = torch.randn(6, 5, dtype=dtype).t()  # non-contiguous
    assert not a.is_contiguous()
    body = combine_body({"forget": as_group([a], "f")}, method={"name": "none"})
    header, data = _decode(body)
    (t,) = header.tensors
    assert t.dtype == wire.TAG_BY_NAME[str(dtype).removeprefix("torch.")]
    assert t.shape == (5, 6)
    buf = Buffer(len(data), torch_out=True)
    buf.view[:] = data
    got = buf.tensor(t.dtype, t.shape, t.begin, t.end)
    assert torch.equal(got, a)


def test_large_tensor_streams_in_slices() -> None:
    a = torch.randn(CHUNK_BYTES // 4 * 3 + 17)
    body = combine_body({"forget": as_group(a, "f")}, method={"name": "none"})
    chunks = list(body)
    assert max(len(c) for c in chunks) <= CHUNK_BYTES
    assert len(chunks) >= 4
    # replayable: a retry sends the same bytes
    assert b"".join(bytes(c) for c in body) == b"".join(bytes(c) for c in chunks)


def test_small_tensors_are_coalesced_into_few_writes() -> None:
    """256 small tensors and two large ones: full-size writes (the last shorter), the large tensors'
    interior slices sent as views, and the bytes those of the file."""
    gen = torch.Generator().manual_seed(0)
    small = [torch.randn(4, 320 + i, generator=gen) for i in range(256)]
    large = [torch.randn(CHUNK_BYTES // 2, generator=gen), torch.randn(CHUNK_BYTES // 4 * 3, generator=gen)]
    group = as_group([*small[:100], *large, *small[100:], torch.zeros(0)], "f")
    body = combine_body({"forget": group}, method={"name": "none"})
    chunks = list(body)
    assert all(len(c) == CHUNK_BYTES for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= CHUNK_BYTES
    assert len(chunks) == -(-body.length // CHUNK_BYTES)
    assert any(isinstance(c, memoryview) for c in chunks)  # a slice inside a large tensor: no copy here
    header, data = _decode(body)
    assert len(header.tensors) == 259
    for t, a in zip(header.tensors, group.arrays, strict=True):
        assert data[t.begin : t.end] == a.numpy().tobytes()
    assert b"".join(bytes(c) for c in body) == b"".join(bytes(c) for c in chunks)


def test_host_bytes_is_a_view_for_contiguous_cpu() -> None:
    a = torch.randn(100)
    mv = host_bytes(a)
    a[0] = 42.0
    assert np.frombuffer(mv, np.float32)[0] == 42.0
    n = np.arange(10, dtype=np.float64)
    mv = host_bytes(n)
    n[3] = -1
    assert np.frombuffer(mv, np.float64)[3] == -1


def test_big_endian_numpy_is_converted() -> None:
    a = np.arange(5, dtype=">f4")
    assert np.frombuffer(host_bytes(a), "<f4").tolist() == [0, 1, 2, 3, 4]


def test_bad_inputs_refused() -> None:
    with pytest.raises(ValueError, match="None"):
        as_group([torch.randn(2), None], "forget")
    with pytest.raises(TypeError):
        as_group([[1.0, 2.0]], "forget")
    with pytest.raises(ValueError, match="no gradients"):
        as_group([], "forget")


def test_numpy_buffer_views_in_place(rng: np.random.Generator) -> None:
    x = rng.standard_normal(9)
    head, _ = wire.build_header([("scaled_grad", "F64", (9,))])
    data = head + x.tobytes()
    buf = Buffer(len(data), torch_out=False)
    buf.view[:] = data
    (t,) = wire.parse(buf.view).tensors
    got = buf.tensor(t.dtype, t.shape, t.begin, t.end)
    np.testing.assert_array_equal(got, x)
    assert np.shares_memory(got, buf.raw)
