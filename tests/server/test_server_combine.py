"""Results over HTTP equal the engine's, for every body form, layout, Accept and dtype."""

from __future__ import annotations

import json
import math
import zlib

import httpx
import pytest
import torch
from gradweight.methods import parse_method
from gradweight_server.engine import run
from srv_util import (
    OCTET,
    expect,
    json_body,
    load_reply,
    multipart_body,
    part_file,
    random_groups,
    safetensors_body,
)

METHODS = [
    {"name": "munba"},
    {"name": "nash"},
    {"name": "simple", "forget_weight": 0.7, "retain_weight": -1.5},
]


def reference(spec: dict, groups: dict, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    outcome = run(
        parse_method(spec), groups, keys=[str(i) for i in range(len(groups["forget"]))], out_dtype=dtype
    )
    return outcome.flat, outcome.weights


def send(
    url: str, form: str, groups: dict, spec: dict, query: str = "", accept: str | None = None
) -> httpx.Response:
    headers = {"accept": accept} if accept else {}
    if form == "octet":
        body = safetensors_body(groups, metadata={"method": spec})
        return httpx.post(f"{url}/v1/combine{query}", content=body, headers=OCTET | headers)
    if form == "multipart":
        data, ctype = multipart_body(
            [
                ("forget", part_file(groups["forget"])),
                ("retain", part_file(groups["retain"])),
                ("method", json.dumps(spec).encode()),
            ]
        )
        return httpx.post(f"{url}/v1/combine{query}", content=data, headers={"content-type": ctype} | headers)
    return httpx.post(f"{url}/v1/combine{query}", json=json_body(groups, spec), headers=headers)


@pytest.mark.parametrize("form", ["octet", "multipart", "json"])
@pytest.mark.parametrize("layout", ["flat", "params"])
@pytest.mark.parametrize("spec", METHODS, ids=lambda s: s["name"])
def test_result_equals_engine(live_server, form, layout, spec):
    seed = zlib.crc32(f"{form}{layout}{spec}".encode())
    groups = random_groups(seed)
    if form == "json":
        groups = {g: [t.to(torch.float64) for t in ts] for g, ts in groups.items()}
    expected, weights = reference(spec, groups)
    resp = send(live_server.url, form, groups, spec, f"?layout={layout}")
    assert resp.status_code == 200, resp.text
    tensors, meta = load_reply(resp.content)
    if layout == "flat":
        assert list(tensors) == ["scaled_grad"]
        got = tensors["scaled_grad"]
    else:
        shapes = [t.reshape(-1).shape if form == "json" else t.shape for t in groups["forget"]]
        assert [tensors[str(i)].shape for i in range(len(shapes))] == shapes
        got = torch.cat([tensors[str(i)].reshape(-1) for i in range(len(shapes))])
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    assert json.loads(meta["weights"]) == weights
    assert json.loads(meta["method"]) == parse_method(spec).model_dump(mode="json")
    assert meta["device"] == "cpu"
    assert set(json.loads(meta["timing"])) == {"receive_ms", "decode_ms", "compute_ms", "encode_ms"}
    assert ("gram" in meta) == parse_method(spec).needs_gram


@pytest.mark.parametrize("form", ["octet", "multipart", "json"])
def test_json_reply(live_server, form):
    groups = random_groups(7)
    if form == "json":
        groups = {g: [t.to(torch.float64) for t in ts] for g, ts in groups.items()}
    expected, weights = reference({"name": "munba"}, groups)
    resp = send(live_server.url, form, groups, {"name": "munba"}, accept="application/json")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert set(doc) >= {
        "method",
        "weights",
        "gram",
        "numel",
        "dtype",
        "norm",
        "device",
        "timing",
        "scaled_grad",
    }
    assert doc["weights"] == weights
    assert doc["numel"] == expected.numel()
    assert doc["dtype"] == str(expected.dtype).removeprefix("torch.")
    assert torch.equal(torch.tensor(doc["scaled_grad"], dtype=expected.dtype), expected)
    assert math.isclose(doc["norm"], float(expected.double().norm()), rel_tol=1e-12)
    assert len(doc["gram"]) == 2


def test_json_reply_elides_large_results(make_server):
    live = make_server(json_max_elements=10, warmup=False)
    groups = random_groups(8)
    resp = send(live.url, "octet", groups, {"name": "munba"}, accept="application/json")
    assert resp.status_code == 200
    assert resp.json()["scaled_grad"] is None
    assert resp.json()["numel"] == 3 * 4 + 5 + 8


@pytest.mark.parametrize("accept", [None, "*/*", "application/octet-stream", "application/json;q=0.5, */*"])
def test_octet_is_the_default(live_server, accept):
    resp = send(live_server.url, "octet", random_groups(9), {"name": "nash"}, accept=accept)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("form", ["octet", "json"])
def test_dtype_query(live_server, dtype, form):
    groups = random_groups(10)
    if form == "json":
        groups = {g: [t.to(torch.float64) for t in ts] for g, ts in groups.items()}
    expected, _ = reference({"name": "munba"}, groups, getattr(torch, dtype))
    resp = send(live_server.url, form, groups, {"name": "munba"}, f"?dtype={dtype}")
    assert resp.status_code == 200, resp.text
    got = load_reply(resp.content)[0]["scaled_grad"]
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(live_server, dtype):
    groups = random_groups(11, dtype=dtype)
    expected, _ = reference({"name": "nash"}, groups)
    resp = send(live_server.url, "octet", groups, {"name": "nash"})
    assert resp.status_code == 200, resp.text
    got = load_reply(resp.content)[0]["scaled_grad"]
    assert got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("form", ["octet", "json"])
def test_method_query_shorthand(live_server, form):
    groups = random_groups(12)
    if form == "json":
        groups = {g: [t.to(torch.float64) for t in ts] for g, ts in groups.items()}
        resp = httpx.post(f"{live_server.url}/v1/combine?method=munba", json=json_body(groups))
    else:
        body = safetensors_body(groups)
        resp = httpx.post(f"{live_server.url}/v1/combine?method=munba", content=body, headers=OCTET)
    assert resp.status_code == 200, resp.text
    expected, _ = reference({"name": "munba"}, groups)
    assert torch.equal(load_reply(resp.content)[0]["scaled_grad"], expected)


def test_order_metadata_and_named_keys(live_server):
    names = ["encoder.layer.0.weight", "encoder.layer.0.bias", "head.weight"]
    groups = random_groups(13)
    body = safetensors_body(groups, keys=names, metadata={"method": {"name": "munba"}, "order": names})
    resp = httpx.post(f"{live_server.url}/v1/combine?layout=params", content=body, headers=OCTET)
    assert resp.status_code == 200, resp.text
    expected, _ = reference({"name": "munba"}, groups)
    tensors, _ = load_reply(resp.content)
    assert torch.equal(torch.cat([tensors[n].reshape(-1) for n in names]), expected)


def test_numeric_key_order(live_server):
    """Without `order`, keys sort numerically: 2 before 10."""
    gen = torch.Generator().manual_seed(14)
    groups = {g: [torch.randn(i + 1, generator=gen) for i in range(12)] for g in ("retain", "forget")}
    body = safetensors_body(groups, metadata={"method": {"name": "munba"}})
    resp = httpx.post(f"{live_server.url}/v1/combine", content=body, headers=OCTET)
    assert resp.status_code == 200
    expected, _ = reference({"name": "munba"}, groups)
    assert torch.equal(load_reply(resp.content)[0]["scaled_grad"], expected)


def test_none_without_retain(live_server):
    groups = random_groups(15, names=("forget",))
    body = safetensors_body(groups, metadata={"method": {"name": "none"}})
    resp = httpx.post(f"{live_server.url}/v1/combine", content=body, headers=OCTET)
    assert resp.status_code == 200, resp.text
    assert torch.equal(
        load_reply(resp.content)[0]["scaled_grad"], torch.cat([t.reshape(-1) for t in groups["forget"]])
    )


@pytest.mark.parametrize("form", ["octet", "multipart", "json"])
def test_more_than_two_groups(live_server, form):
    names = ["task.a", "task-b", "c_3"]
    groups = random_groups(16, names=names)
    if form == "json":
        groups = {g: [t.to(torch.float64) for t in ts] for g, ts in groups.items()}
    spec = {"name": "nash"}
    outcome = run(parse_method(spec), groups, keys=["0", "1", "2"])
    if form == "octet":
        body = safetensors_body(groups, metadata={"method": spec, "groups": names})
        resp = httpx.post(f"{live_server.url}/v1/combine", content=body, headers=OCTET)
    elif form == "multipart":
        parts = [(g, part_file(groups[g])) for g in names]
        data, ctype = multipart_body(
            [*parts, ("method", b'{"name":"nash"}'), ("groups", json.dumps(names).encode())]
        )
        resp = httpx.post(f"{live_server.url}/v1/combine", content=data, headers={"content-type": ctype})
    else:
        doc = {"method": spec, "groups": {g: [t.reshape(-1).tolist() for t in groups[g]] for g in names}}
        resp = httpx.post(f"{live_server.url}/v1/combine", json=doc)
    assert resp.status_code == 200, resp.text
    tensors, meta = load_reply(resp.content)
    assert torch.equal(tensors["scaled_grad"], outcome.flat)
    assert list(json.loads(meta["weights"])) == names
    assert json.loads(meta["gram"]) == outcome.gram


def test_chunked_upload(live_server):
    groups = random_groups(17)
    body = safetensors_body(groups, metadata={"method": {"name": "munba"}})

    def chunks():
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    resp = httpx.post(f"{live_server.url}/v1/combine", content=chunks(), headers=OCTET)
    assert resp.status_code == 200, resp.text
    expected, _ = reference({"name": "munba"}, groups)
    assert torch.equal(load_reply(resp.content)[0]["scaled_grad"], expected)


def test_request_id_echoed_and_generated(live_server):
    resp = httpx.get(f"{live_server.url}/healthz", headers={"x-request-id": "trainer-42.step-7"})
    assert resp.headers["x-request-id"] == "trainer-42.step-7"
    a = httpx.get(f"{live_server.url}/healthz").headers["x-request-id"]
    b = httpx.get(f"{live_server.url}/healthz").headers["x-request-id"]
    assert a
    assert b
    assert a != b
    bad = expect(
        httpx.post(f"{live_server.url}/v1/combine", content=b"x", headers=OCTET | {"x-request-id": "rid-1"}),
        400,
        "malformed-body",
    )
    assert bad["request_id"] == "rid-1"


def test_weights_endpoint_matches_combine(live_server):
    groups = random_groups(18)
    resp = send(live_server.url, "octet", groups, {"name": "nash"})
    meta = load_reply(resp.content)[1]
    gram = json.loads(meta["gram"])
    w = httpx.post(f"{live_server.url}/v1/weights", json={"method": {"name": "nash"}, "gram": gram})
    assert w.status_code == 200, w.text
    assert w.json()["weights"] == json.loads(meta["weights"])
    assert w.json()["method"] == {"name": "nash", "max_norm": None}
    q = httpx.post(f"{live_server.url}/v1/weights?method=nash", json={"gram": gram})
    assert q.json()["weights"] == w.json()["weights"]


def test_weights_endpoint_groups(live_server):
    gram = [[4.0, 1.0, 0.5], [1.0, 9.0, -1.0], [0.5, -1.0, 2.0]]
    resp = httpx.post(
        f"{live_server.url}/v1/weights",
        json={"method": {"name": "nash"}, "gram": gram, "groups": ["a", "b", "c"]},
    )
    assert resp.status_code == 200, resp.text
    assert list(resp.json()["weights"]) == ["a", "b", "c"]


def test_methods_info_health_metrics(live_server):
    url = live_server.url
    methods = httpx.get(f"{url}/v1/methods").json()
    names = {m["name"] for m in methods}
    assert {"none", "simple", "munba", "nash"} <= names
    assert len(names) == 27
    for m in methods:
        assert set(m) >= {"name", "summary", "reference", "options", "needs_gram", "groups", "guarantee"}
        assert m["options"]["type"] == "object"
        assert m["guarantee"]
        # the test environment installs the cvxpy extra, so every served method can run here
        assert m["available"] is (m["name"] != "excess_mtl"), m
        assert (m["unavailable_reason"] is None) is m["available"]
    assert {m["name"]: m["requires"] for m in methods if m["requires"]} == {
        "cagrad": "cvxpy",
        "nash_mtl": "cvxpy",
    }
    assert next(m for m in methods if m["name"] == "munba")["groups"] == {
        "min": 2,
        "max": 2,
        "names": ["retain", "forget"],
    }
    info = httpx.get(f"{url}/v1/info").json()
    assert info["device"] == "cpu"
    assert info["torch"] == torch.__version__
    assert info["limits"]["max_body_bytes"] == live_server.settings.max_body_bytes
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    send(url, "octet", random_groups(19), {"name": "munba"})
    text = httpx.get(f"{url}/metrics").text
    assert 'gradweight_requests_total{route="/v1/combine",status="200"}' in text
    assert 'gradweight_stage_seconds_count{method="munba",stage="compute"}' in text
    assert "gradweight_request_bytes_bucket" in text
    assert "gradweight_inflight_bytes" in text


def test_openapi_describes_binary_bodies(live_server):
    doc = httpx.get(f"{live_server.url}/openapi.json").json()
    op = doc["paths"]["/v1/combine"]["post"]
    assert set(op["requestBody"]["content"]) == {
        "application/octet-stream",
        "multipart/form-data",
        "application/json",
    }
    assert op["requestBody"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert "example" in op["requestBody"]["content"]["application/json"]
    assert "application/octet-stream" in op["responses"]["200"]["content"]
    assert httpx.get(f"{live_server.url}/docs").status_code == 200


@pytest.mark.parametrize("form", ["octet", "json"])
def test_stateful_method_round_trips_its_state(live_server, form):
    """The server keeps no state: step 2 with step 1's `state` equals the engine's step 2."""
    names = ["a", "b", "c"]
    spec = {"name": "gradvac", "seed": 3}
    steps = [random_groups(40 + i, names=names, dtype=torch.float64) for i in range(2)]
    state = None
    for groups in steps:
        expected = run(parse_method(spec), groups, keys=["0", "1", "2"], state=state)
        if form == "octet":
            meta = {"method": spec, "groups": names} | ({"state": json.dumps(state)} if state else {})
            resp = httpx.post(
                f"{live_server.url}/v1/combine",
                content=safetensors_body(groups, metadata=meta),
                headers=OCTET,
            )
            assert resp.status_code == 200, resp.text
            tensors, reply_meta = load_reply(resp.content)
            got, state_text = tensors["scaled_grad"], reply_meta["state"]
        else:
            doc = {"method": spec, "groups": {g: [t.reshape(-1).tolist() for t in groups[g]] for g in names}}
            if state:
                doc["state"] = json.dumps(state)
            resp = httpx.post(f"{live_server.url}/v1/combine", json=doc)
            assert resp.status_code == 200, resp.text
            tensors, reply_meta = load_reply(resp.content)
            got, state_text = tensors["scaled_grad"], reply_meta["state"]
        assert torch.equal(got, expected.flat)
        assert json.loads(state_text) == json.loads(json.dumps(expected.state))
        state = json.loads(state_text)


@pytest.mark.parametrize("boundary", ["b", "bb", "bbb", "bbbb"])
def test_multipart_parts_at_any_alignment(live_server, boundary):
    """A part can start at any byte; misaligned data is copied once, never viewed misaligned."""
    groups = random_groups(50, dtype=torch.float64)
    data, ctype = multipart_body(
        [
            ("forget", part_file(groups["forget"])),
            ("retain", part_file(groups["retain"])),
            ("method", b"nash"),
        ],
        boundary=boundary,
    )
    resp = httpx.post(f"{live_server.url}/v1/combine", content=data, headers={"content-type": ctype})
    assert resp.status_code == 200, resp.text
    expected, _ = reference({"name": "nash"}, groups)
    assert torch.equal(load_reply(resp.content)[0]["scaled_grad"], expected)


@pytest.mark.parametrize("form", ["octet", "multipart"])
def test_an_empty_tensor_between_others_keeps_its_place(live_server, form):
    """An empty tensor's bytes begin where the next tensor's do: each view is keyed by its whole span,
    so the empty key gets an empty view (it once got its neighbour's), sent twice to use the kept plan."""
    groups = random_groups(11, shapes=((3, 4), (0,), (5,), (0, 2), (2, 2, 2)))
    expected, weights = reference({"name": "munba"}, groups)
    for _ in range(2):
        resp = send(live_server.url, form, groups, {"name": "munba"}, "?layout=params")
        assert resp.status_code == 200, resp.text
        tensors, meta = load_reply(resp.content)
        assert [tuple(tensors[str(i)].shape) for i in range(5)] == [(3, 4), (0,), (5,), (0, 2), (2, 2, 2)]
        got = torch.cat([tensors[str(i)].reshape(-1) for i in range(5)])
        assert torch.equal(got, expected)
        assert json.loads(meta["weights"]) == weights
