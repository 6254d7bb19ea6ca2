"""Security properties: the token guards every /v1 endpoint, no pickle on the request path, constant-time
token comparison, and no traceback, path or exception text in any error body."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import httpx
import pytest
import torch
from rel_util import LEAKS, OCTET, body_of, check_answer, make_groups, problem

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
REQUEST_PATH_SOURCES = [ROOT / "service" / "gradweight_server", ROOT / "client" / "gradweight"]
TOKEN = "s3cret-token-\u00e9"[:-1] + "x"  # ASCII; header values are latin-1
GOOD = {"authorization": f"Bearer {TOKEN}"}


def _sources() -> list[Path]:
    files = [p for d in REQUEST_PATH_SOURCES for p in sorted(d.rglob("*.py"))]
    assert len(files) > 10, files
    return files


@pytest.mark.parametrize(
    "pattern",
    [
        r"\bimport\s+(c?pickle|dill|joblib|shelve|marshal)\b",
        r"\bfrom\s+(c?pickle|dill|joblib|shelve|marshal)\b",
        r"\bpickle\.",
        r"\btorch\.load\s*\(",
        r"allow_pickle\s*=\s*True",
        r"weights_only\s*=\s*False",
        r"\b(eval|exec)\s*\(",
        r"\byaml\.load\s*\(",
    ],
)
def test_no_unsafe_deserialisation_in_the_request_path_sources(pattern):
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in _sources()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(pattern, line) and not line.lstrip().startswith("#")
    ]
    assert not hits, hits


def test_requests_are_served_with_pickle_and_torch_load_disabled(live_server, monkeypatch):
    """The server runs in this process: make every unpickling entry point explode, then serve every form."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling on the request path")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    groups = make_groups(11, 300)
    spec = {"name": "munba"}
    resp = httpx.post(
        f"{live_server.url}/v1/combine", content=body_of(groups, spec), headers=OCTET, timeout=60
    )
    assert resp.status_code == 200, resp.text[:300]
    check_answer(resp.content, spec, groups)
    import safetensors.torch as st

    parts = {g: st.save({str(i): t for i, t in enumerate(ts)}) for g, ts in groups.items()}
    files = {g: (f"{g}.safetensors", data, "application/octet-stream") for g, data in parts.items()}
    resp = httpx.post(
        f"{live_server.url}/v1/combine", files=files, data={"method": '{"name": "munba"}'}, timeout=60
    )
    assert resp.status_code == 200, resp.text[:300]
    check_answer(resp.content, spec, groups)
    doc = {"method": spec, **{g: [t.tolist() for t in ts] for g, ts in groups.items()}}
    resp = httpx.post(
        f"{live_server.url}/v1/combine", json=doc, headers={"accept": "application/json"}, timeout=60
    )
    assert resp.status_code == 200, resp.text[:300]
    resp = httpx.post(
        f"{live_server.url}/v1/weights", json={"method": spec, "gram": [[2.0, 0.5], [0.5, 1.0]]}, timeout=60
    )
    assert resp.status_code == 200, resp.text[:300]


def test_token_comparison_is_constant_time():
    deps = (ROOT / "service" / "gradweight_server" / "deps.py").read_text()
    assert "hmac.compare_digest" in deps or "secrets.compare_digest" in deps
    assert not re.search(r"(value|given|token)\S*\s*[!=]=\s*(expected|token)", deps)


def test_every_v1_endpoint_requires_the_token(make_server):
    live = make_server(token=TOKEN, warmup=False)
    paths = live.app.openapi()["paths"]
    v1 = [(m.upper(), p) for p, item in paths.items() if p.startswith("/v1/") for m in item]
    assert {
        ("POST", "/v1/combine"),
        ("POST", "/v1/weights"),
        ("GET", "/v1/methods"),
        ("GET", "/v1/info"),
    } <= set(v1)
    body = body_of(make_groups(1, 16), {"name": "munba"})
    bad_headers: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer"},
        {"authorization": 'Bearer ""'},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Bearer {TOKEN[:-1]}"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": TOKEN},
        {"authorization": "Bearer " + "A" * 10_000},
        {"x-api-key": TOKEN},
    ]
    with httpx.Client(timeout=30) as client:
        for method, path in v1:
            for headers in bad_headers:
                resp = client.request(
                    method,
                    live.url + path,
                    content=body if method == "POST" else None,
                    headers=OCTET | headers,
                )
                assert problem(resp, [401])["code"] == "unauthorized", (method, path, headers)
                assert resp.headers.get("x-request-id")
            resp = client.request(
                method, live.url + path, content=body if method == "POST" else None, headers=OCTET | GOOD
            )
            assert resp.status_code != 401, (method, path)
        # The scheme is case-insensitive (RFC 9110); the right token is served.
        resp = client.post(
            live.url + "/v1/combine", content=body, headers=OCTET | {"authorization": f"bearer {TOKEN}"}
        )
        assert resp.status_code == 200, resp.text[:300]
        # Ops endpoints stay open for probes and scrapers.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(live.url + path).status_code == 200, path


def test_unauthorised_upload_is_refused_before_the_body_is_read(make_server):
    """A 2 GiB declared body without the token gets 401 at once; nothing is allocated or awaited."""
    from rel_util import open_request, read_response

    live = make_server(token=TOKEN, warmup=False)
    sock = open_request(
        live.url,
        "POST /v1/combine HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {2**31 - 1}",
    )
    try:
        status, _, data = read_response(sock, timeout=10)
    finally:
        sock.close()
    assert status == 401, data[:200]


def test_internal_errors_leak_nothing(live_server, monkeypatch):
    """An unexpected exception carrying a path and a secret becomes a bare 500 problem; the server goes on."""
    from gradweight_server.routers import combine

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"secret at {ROOT}/service/gradweight_server/engine/core.py line 42")

    monkeypatch.setattr(combine, "run", boom)
    groups = make_groups(5, 64)
    resp = httpx.post(
        f"{live_server.url}/v1/combine", content=body_of(groups, {"name": "munba"}), headers=OCTET, timeout=30
    )
    body = problem(resp, [500])
    assert body["code"] == "internal"
    assert "secret" not in resp.text
    assert str(ROOT) not in resp.text
    monkeypatch.undo()
    resp = httpx.post(
        f"{live_server.url}/v1/combine", content=body_of(groups, {"name": "munba"}), headers=OCTET, timeout=30
    )
    assert resp.status_code == 200
    check_answer(resp.content, {"name": "munba"}, groups)


def test_error_details_do_not_echo_unbounded_input(live_server):
    """A megabyte-long method name is not reflected whole into the problem (log and response stay small)."""
    name = "x" * 1_000_000
    resp = httpx.post(
        f"{live_server.url}/v1/weights", json={"method": {"name": name}, "gram": [[1, 0], [0, 1]]}, timeout=30
    )
    body = problem(resp, [422])
    assert len(resp.content) < 10_000, len(resp.content)
    assert not LEAKS.search(body["detail"])
