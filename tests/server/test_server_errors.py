"""Every row of PROTOCOL.md's error table, each from a real malformed request to a real server."""

from __future__ import annotations

import json
import struct

import httpx
import pytest
import torch
from srv_util import (
    OCTET,
    expect,
    json_body,
    multipart_body,
    part_file,
    random_groups,
    raw_request,
    safetensors_body,
)

MUNBA = {"method": {"name": "munba"}}


def post(
    url: str, body: bytes, query: str = "", headers: dict | None = None, timeout: float = 30
) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/combine{query}", content=body, headers=OCTET | (headers or {}), timeout=timeout
    )


def handmade(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ---- 400 malformed-body -------------------------------------------------------------------------------


def test_lying_content_length_shorter_than_the_file(live_server):
    body = safetensors_body(random_groups(1), metadata=MUNBA)
    cut = len(body) - 17
    status, headers, data = raw_request(
        live_server.url,
        f"POST /v1/combine HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {cut}\r\nConnection: close",
        body[:cut],
    )
    assert status == 400
    assert json.loads(data)["code"] == "malformed-body"
    assert "x-request-id" in headers


def test_lying_content_length_longer_than_the_body_frees_the_buffer(make_server):
    live = make_server(max_concurrency=1, warmup=False)
    body = safetensors_body(random_groups(2), metadata=MUNBA)
    with pytest.raises((ConnectionError, OSError, Exception)):
        raw_request(
            live.url,
            f"POST /v1/combine HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body) + 1000}",
            body,
            shutdown=True,
            timeout=5,
        )
    _wait_idle(live)
    assert post(live.url, body).status_code == 200


def _wait_idle(live, timeout: float = 10.0) -> None:
    import time

    adm = live.app.state.runtime.admission
    deadline = time.monotonic() + timeout
    while adm.requests or adm.bytes:
        assert time.monotonic() < deadline, "admission never released"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x05\x00", id="shorter-than-length"),
        pytest.param(struct.pack("<Q", 1 << 40) + b"{}", id="length-over-limit"),
        pytest.param(struct.pack("<Q", 500) + b'{"__metadata__": {}}', id="length-past-end"),
        pytest.param(handmade({}, b"", length=2)[:8] + b"[]", id="not-an-object"),
        pytest.param(struct.pack("<Q", 4) + b"\xff\xfe{}", id="not-utf8"),
        pytest.param(
            handmade(
                {
                    "forget/0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "retain/0": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                bytes(12),
            ),
            id="overlapping-spans",
        ),
        pytest.param(
            handmade(
                {
                    "forget/0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "retain/0": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
                },
                bytes(20),
            ),
            id="hole",
        ),
        pytest.param(
            handmade({"forget/0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)),
            id="trailing-bytes",
        ),
        pytest.param(
            handmade({"forget/0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
            id="truncated",
        ),
        pytest.param(
            handmade({"forget/0": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
            id="unknown-dtype",
        ),
        pytest.param(
            handmade({"forget/0": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
            id="shape-span-mismatch",
        ),
        pytest.param(
            handmade({"forget/0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, bytes(8)),
            id="extra-entry-field",
        ),
        pytest.param(
            struct.pack("<Q", 59)
            + b'{"a/0":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a/0":1}'[:59]
            + bytes(4),
            id="duplicate-name",
        ),
        pytest.param(
            handmade({"forget": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
            id="name-without-group",
        ),
        pytest.param(
            handmade({"for get/0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
            id="bad-group-name",
        ),
        pytest.param(
            handmade(
                {
                    "__metadata__": {"method": 3},
                    "forget/0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                },
                bytes(8),
            ),
            id="metadata-not-strings",
        ),
        pytest.param(
            handmade(
                {
                    "__metadata__": {"order": "[0,"},
                    "forget/0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                },
                bytes(8),
            ),
            id="order-not-json",
        ),
    ],
)
def test_bad_safetensors(live_server, body):
    expect(post(live_server.url, body), 400, "malformed-body")


def test_100k_tiny_tensors(live_server):
    n = 50_000
    header = {
        f"{g}/{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * (j * n + i), 4 * (j * n + i) + 4]}
        for j, g in enumerate(("retain", "forget"))
        for i in range(n)
    }
    body = handmade(header, torch.randn(2 * n).numpy().tobytes())
    detail = expect(post(live_server.url, body, "?method=munba"), 400, "malformed-body")["detail"]
    assert "100000 tensors" in detail


@pytest.mark.slow
def test_100k_tiny_tensors_within_a_raised_limit(make_server):
    live = make_server(max_tensors=100_000, warmup=False)
    n = 50_000
    groups = {
        g: list(torch.randn(n, generator=torch.Generator().manual_seed(j)).split(1))
        for j, g in enumerate(("retain", "forget"))
    }
    resp = post(live.url, safetensors_body(groups, metadata=MUNBA), timeout=120)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "payload",
    [
        b"{",
        b"[1, 2]",
        b'{"method": {"name": "munba"}, "forget": [[1.0]], "retain": [[2.0]], "extra": 1}',
        b'{"groups": {"a": [[1.0]]}, "forget": [[1.0]]}',
        b"\xff",
    ],
    ids=["truncated", "not-object", "unknown-field", "groups-and-pair", "not-utf8"],
)
def test_bad_json(live_server, payload):
    resp = httpx.post(
        f"{live_server.url}/v1/combine", content=payload, headers={"content-type": "application/json"}
    )
    expect(resp, 400, "malformed-body")


def test_bad_multipart(live_server):
    url = f"{live_server.url}/v1/combine"
    groups = random_groups(3)
    expect(
        httpx.post(url, content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
        400,
        "malformed-body",
    )
    good, ctype = multipart_body([("forget", part_file(groups["forget"])), ("method", b"munba")])
    expect(
        httpx.post(url, content=good[: len(good) // 2], headers={"content-type": ctype}),
        400,
        "malformed-body",
    )
    bad_part, ctype = multipart_body([("forget", b"not safetensors"), ("method", b"munba")])
    expect(httpx.post(url, content=bad_part, headers={"content-type": ctype}), 400, "malformed-body")
    twice, ctype = multipart_body([("forget", part_file(groups["forget"]))] * 2)
    expect(httpx.post(url, content=twice, headers={"content-type": ctype}), 400, "malformed-body")


def test_multipart_text_parts_are_bounded(make_server):
    live = make_server(max_header_bytes=1024, warmup=False)
    groups = random_groups(3)
    big_state = b"[" + b"[]," * 1000 + b"[]]"
    data, ctype = multipart_body(
        [
            ("forget", part_file(groups["forget"])),
            ("retain", part_file(groups["retain"])),
            ("state", big_state),
        ]
    )
    resp = httpx.post(f"{live.url}/v1/combine?method=munba", content=data, headers={"content-type": ctype})
    assert "state" in expect(resp, 400, "malformed-body")["detail"]


def test_bad_content_length_header(live_server):
    status, _, _data = raw_request(
        live_server.url,
        "POST /v1/combine HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: -5"
        "\r\nConnection: close",
    )
    assert status == 400


# ---- 401 unauthorized ---------------------------------------------------------------------------------


def test_token(make_server):
    live = make_server(token="s3cret-token", warmup=False)
    body = safetensors_body(random_groups(4), metadata=MUNBA)
    expect(post(live.url, body), 401, "unauthorized")
    expect(post(live.url, body, headers={"authorization": "Bearer wrong"}), 401, "unauthorized")
    expect(post(live.url, body, headers={"authorization": "Basic s3cret-token"}), 401, "unauthorized")
    expect(httpx.get(f"{live.url}/v1/info"), 401, "unauthorized")
    expect(httpx.post(f"{live.url}/v1/weights", json={"gram": [[1, 0], [0, 1]]}), 401, "unauthorized")
    assert post(live.url, body, headers={"authorization": "Bearer s3cret-token"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(live.url + path).status_code == 200


# ---- 413 payload-too-large ----------------------------------------------------------------------------


def test_too_large_refused_from_content_length_before_the_body(make_server):
    live = make_server(max_body_bytes=1000, warmup=False)
    status, _headers, data = raw_request(
        live.url,
        "POST /v1/combine HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {10**12}\r\nConnection: close",
    )
    assert status == 413
    assert json.loads(data)["code"] == "payload-too-large"


def test_too_large_chunked(make_server):
    live = make_server(max_body_bytes=1000, warmup=False)

    def chunks():
        for _ in range(100):
            yield bytes(100)

    try:
        resp = httpx.post(f"{live.url}/v1/combine", content=chunks(), headers=OCTET)
    except httpx.HTTPError:
        pass  # the server may answer and close while the client is still sending
    else:
        expect(resp, 413, "payload-too-large")
    status, _, data = raw_request(
        live.url,
        "POST /v1/combine HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close",
        b"".join(b"%x\r\n" % 400 + bytes(400) + b"\r\n" for _ in range(3)) + b"0\r\n\r\n",
    )
    assert status == 413
    assert json.loads(data)["code"] == "payload-too-large"
    _wait_idle(live)


def test_json_body_has_its_own_smaller_limit(make_server):
    live = make_server(max_json_body_bytes=100, warmup=False)
    doc = json_body(random_groups(5), {"name": "munba"})
    expect(httpx.post(f"{live.url}/v1/combine", json=doc), 413, "payload-too-large")


# ---- 415 unsupported-media-type -----------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_unsupported_media_type(live_server, ctype):
    headers = {"content-type": ctype} if ctype else {}
    resp = httpx.post(f"{live_server.url}/v1/combine", content=b"abc", headers=headers)
    expect(resp, 415, "unsupported-media-type")


def test_weights_takes_json_only(live_server):
    expect(
        httpx.post(f"{live_server.url}/v1/weights", content=b"x", headers=OCTET),
        415,
        "unsupported-media-type",
    )


# ---- 422 invalid-method -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "query"),
    [
        ({"method": {"name": "nope"}}, ""),
        ({"method": {"name": "simple", "bogus": 1}}, ""),
        ({"method": {"name": "simple", "forget_weight": "x"}}, ""),
        ({"method": {"name": "nash", "max_norm": -1}}, ""),
        ({"method": {"nom": "munba"}}, ""),
        ({"method": "{not json"}, ""),
        ({}, ""),
        ({"method": {"name": "munba"}}, "?method=munba"),
        ({}, "?method=nope"),
        ({"method": {"name": "munba"}}, "?layout=diagonal"),
        ({"method": {"name": "munba"}}, "?dtype=int8"),
    ],
    ids=[
        "unknown-name",
        "unknown-option",
        "bad-option",
        "out-of-range",
        "no-name",
        "not-json",
        "missing",
        "twice",
        "unknown-query",
        "bad-layout",
        "bad-dtype",
    ],
)
def test_invalid_method(live_server, meta, query):
    body = safetensors_body(random_groups(6), metadata=meta)
    expect(post(live_server.url, body, query), 422, "invalid-method")


def test_invalid_method_in_multipart_and_json(live_server):
    groups = random_groups(7)
    data, ctype = multipart_body(
        [
            ("forget", part_file(groups["forget"])),
            ("retain", part_file(groups["retain"])),
            ("method", b'{"name": "munba"}'),
        ]
    )
    resp = httpx.post(
        f"{live_server.url}/v1/combine?method=munba", content=data, headers={"content-type": ctype}
    )
    expect(resp, 422, "invalid-method")
    resp = httpx.post(f"{live_server.url}/v1/combine", json=json_body(groups, {"name": "x"}))
    expect(resp, 422, "invalid-method")
    resp = httpx.post(f"{live_server.url}/v1/combine", json=json_body(groups))
    expect(resp, 422, "invalid-method")


# ---- 422 invalid-gradients ----------------------------------------------------------------------------


def _ig(url: str, groups: dict, meta: dict | None = None, keys: list[str] | None = None) -> dict:
    body = safetensors_body(groups, metadata={**MUNBA, **(meta or {})}, keys=keys)
    return expect(post(url, body), 422, "invalid-gradients")


def test_invalid_gradients(live_server):
    url = live_server.url
    g = random_groups(8)
    _ig(url, {"forget": g["forget"]})
    _ig(url, {"forget": g["forget"], "retain": g["retain"][:2]})
    _ig(url, {"forget": g["forget"], "retain": [g["retain"][0], g["retain"][1], torch.randn(3)]})
    _ig(url, g, keys=["w", "b", "c"])
    _ig(url, g, meta={"order": ["0", "1"]})
    _ig(
        url,
        {
            "forget": [t.to(torch.int32) for t in g["forget"]],
            "retain": [t.to(torch.int32) for t in g["retain"]],
        },
    )
    _ig(url, {"forget": g["forget"], "retain": [t.double() for t in g["retain"]]})
    _ig(url, {**g, "extra": [t.clone() for t in g["forget"]]})
    _ig(url, g, meta={"groups": ["retain", "forget", "other"]})
    _ig(url, g, meta={"groups": ["retain", "bad name"]})
    _ig(url, {"forget": [torch.empty(0)], "retain": [torch.empty(0)]})


def test_invalid_gradients_in_json_body(live_server):
    url = f"{live_server.url}/v1/combine?method=munba"
    expect(httpx.post(url, json={"forget": [], "retain": []}), 422, "invalid-gradients")
    expect(httpx.post(url, json={"forget": [["a"]], "retain": [[1.0]]}), 422, "invalid-gradients")
    expect(httpx.post(url, json={"forget": [[[1.0]]], "retain": [[1.0]]}), 422, "invalid-gradients")
    expect(httpx.post(url, json={"forget": [[1.0, 2.0]], "retain": [[1.0]]}), 422, "invalid-gradients")


@pytest.mark.parametrize(
    "gram",
    [
        [[1.0, float("nan")], [0.0, 1.0]],
        [[1.0, 0.5], [0.0, 1.0]],
        [[1.0, 2.0], [2.0, 1.0]],
        [[1.0, 0.0]],
        "x",
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    ],
    ids=["nan", "asymmetric", "not-psd", "not-square", "not-matrix", "wrong-size"],
)
def test_bad_gram(live_server, gram):
    content = json.dumps({"method": {"name": "nash"}, "gram": gram}).replace("NaN", "NaN").encode()
    resp = httpx.post(
        f"{live_server.url}/v1/weights", content=content, headers={"content-type": "application/json"}
    )
    expect(resp, 422, "invalid-gradients")


# ---- 422 non-finite / degenerate ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(live_server, bad):
    g = random_groups(9)
    g["retain"][1][2] = bad
    body = expect(post(live_server.url, safetensors_body(g, metadata=MUNBA)), 422, "non-finite")
    assert "retain" in body["detail"]
    assert "'1'" in body["detail"]


@pytest.mark.parametrize("method", ["munba", "nash"])
def test_degenerate(live_server, method):
    g = random_groups(10)
    g["forget"] = [torch.zeros_like(t) for t in g["forget"]]
    expect(post(live_server.url, safetensors_body(g), f"?method={method}"), 422, "degenerate")
