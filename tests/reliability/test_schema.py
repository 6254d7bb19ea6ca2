"""Schemathesis against the server's own OpenAPI document: no generated request (schema-conforming or
deliberately not) gets a 5xx, and every error is a problem+json that leaks no trace or path.

Derandomized and small, so CI runs are repeatable. Schemathesis's pytest plugin (`from_fixture`) does not
work under pytest 9, so the cases are drawn from each operation's Hypothesis strategy directly.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from gradweight_server.app import create_app
from gradweight_server.settings import Settings
from hypothesis import HealthCheck, given, settings
from rel_util import LEAKS, alive
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.reliability

# Operation labels from the app itself (building it starts nothing), so parametrize needs no server.
LABELS = sorted(
    f"{method.upper()} {path}"
    for path, item in create_app(Settings(device="cpu", warmup=False)).openapi()["paths"].items()
    for method in item
)
EXAMPLES = {"POST /v1/combine": 40, "POST /v1/weights": 40}


@pytest.fixture(scope="module")
def api_schema(live_server: Any) -> Any:
    return schemathesis.openapi.from_url(live_server.url + "/openapi.json")


def test_the_schema_lists_every_endpoint():
    assert set(LABELS) >= {
        "POST /v1/combine",
        "POST /v1/weights",
        "GET /v1/methods",
        "GET /v1/info",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    }


def _check(response: Any, url: str) -> None:
    status = response.status_code
    assert status < 500, (status, response.text[:300])
    if status >= 400:
        ctype = response.headers.get("content-type") or response.headers.get("Content-Type")
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        assert str(ctype).startswith("application/problem+json"), (status, ctype)
        body = json.loads(response.text)
        assert body["status"] == status
        assert isinstance(body["code"], str)
        assert body["code"]
        assert not LEAKS.search(response.text), response.text[:300]
    alive(url)


# Negative cases (schema-violating) exist only where there are parameters or a body to break.
CASES = [(label, GenerationMode.POSITIVE) for label in LABELS] + [
    (label, GenerationMode.NEGATIVE) for label in LABELS if label.startswith("POST ")
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{lb}-{m.value}" for lb, m in CASES])
def test_generated_requests_never_get_a_5xx(api_schema, live_server, label, mode):
    operation = next(r.ok() for r in api_schema.get_all_operations() if r.ok().label == label)
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(
        max_examples=EXAMPLES.get(label, 5),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=live_server.url, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])
        _check(response, live_server.url)

    run()
