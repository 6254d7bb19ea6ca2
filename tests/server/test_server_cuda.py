"""The CUDA path: one host-to-device copy in, one device-to-host copy out; skipped without a GPU."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from gradweight.methods import parse_method
from gradweight_server.engine import run
from srv_util import OCTET, json_body, load_reply, multipart_body, part_file, random_groups, safetensors_body

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_server(make_server_module):
    return make_server_module(device="cuda")


@pytest.fixture(scope="module")
def make_server_module():
    from conftest import _start

    started = []

    def factory(**overrides):
        live = _start(**overrides)
        started.append(live)
        return live

    yield factory
    for live in started:
        live.stop()


@pytest.mark.parametrize("form", ["octet", "multipart", "json"])
@pytest.mark.parametrize("layout", ["flat", "params"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_engine_on_cuda(cuda_server, form, layout, dtype):
    groups = random_groups(21, dtype=torch.float64 if form == "json" else dtype)
    spec = {"name": "munba"}
    on_gpu = {g: [t.cuda() for t in ts] for g, ts in groups.items()}
    expected = run(parse_method(spec), on_gpu, keys=["0", "1", "2"]).flat.cpu()
    url = f"{cuda_server.url}/v1/combine?layout={layout}"
    if form == "octet":
        resp = httpx.post(url, content=safetensors_body(groups, metadata={"method": spec}), headers=OCTET)
    elif form == "multipart":
        data, ctype = multipart_body(
            [
                ("forget", part_file(groups["forget"])),
                ("retain", part_file(groups["retain"])),
                ("method", json.dumps(spec).encode()),
            ]
        )
        resp = httpx.post(url, content=data, headers={"content-type": ctype})
    else:
        resp = httpx.post(url, json=json_body(groups, spec))
    assert resp.status_code == 200, resp.text
    tensors, meta = load_reply(resp.content)
    assert meta["device"].startswith("cuda")
    got = (
        torch.cat([t.reshape(-1) for t in tensors.values()]) if layout == "params" else tensors["scaled_grad"]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cuda_json_reply_and_info(cuda_server):
    groups = random_groups(22)
    resp = httpx.post(
        f"{cuda_server.url}/v1/combine?method=nash",
        content=safetensors_body(groups),
        headers=OCTET | {"accept": "application/json"},
    )
    assert resp.status_code == 200
    assert resp.json()["device"].startswith("cuda")
    info = httpx.get(f"{cuda_server.url}/v1/info").json()
    assert info["cuda"]["name"]
    assert "gradweight_device_memory_bytes" in httpx.get(f"{cuda_server.url}/metrics").text
