"""The registry: every method file of this package, found by its `METHOD` declaration.

It is checked at import against the protocol's spec classes, so a spec without a server file (or the
reverse) fails the first import rather than a request.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.util import find_spec
from pathlib import Path

import torch
from gradweight.errors import InvalidMethod
from gradweight.methods import SPEC_CLASSES, MethodSpec, parse_method

from ._method import Method


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("_"):
            continue
        method = importlib.import_module(f"{__package__}.{info.name}").METHOD
        method.check()
        found[method.name] = method
    specs = {str(c.model_fields["name"].default): c for c in SPEC_CLASSES}
    if set(found) != set(specs) or any(found[n].spec is not specs[n] for n in specs):
        raise ImportError(f"method files {sorted(found)} do not match the spec classes {sorted(specs)}")
    return {name: found[name] for name in specs}


REGISTRY: dict[str, Method] = _discover()


def lookup(spec: MethodSpec | type[MethodSpec]) -> Method:
    return REGISTRY[str(spec.model_fields["name"].default) if isinstance(spec, type) else spec.name]


def availability(spec: MethodSpec | type[MethodSpec]) -> tuple[bool, str | None]:
    """(True, None) when the method can run on this server, else (False, why and what to install).
    GET /v1/methods reports it as `available` / `unavailable_reason`."""
    method = lookup(spec)
    if method.unavailable is not None:
        return False, method.unavailable
    missing = [m for m in method.requires if find_spec(m) is None]
    if not missing:
        return True, None
    if method.extra:
        hint = f"pip install 'gradweight-server[{method.extra}]'"
    else:
        hint = "reinstall gradweight-server (a required dependency is missing)"
    return False, f"needs {', '.join(missing)}: {hint}"


def require(spec: MethodSpec) -> Method:
    """The spec's method; InvalidMethod naming what to install when it cannot run here."""
    ok, why = availability(spec)
    if not ok:
        raise InvalidMethod(f"method {spec.name!r} is not available on this server: {why}")
    return lookup(spec)


def warm_up() -> list[str]:
    """Run every available method once on small inputs so the first request does not pay for imports
    and solver set-up (quadprog, scipy, cvxpy: up to ~1 s cold). Returns the names warmed."""
    from ._solve import aggregate, solve

    gram = torch.tensor([[2.0, -0.5, 0.3], [-0.5, 1.0, 0.2], [0.3, 0.2, 1.5]], dtype=torch.float64)
    names = ["a", "b", "c"]
    grads = [
        [torch.tensor([1.0, -2.0, 0.5])],
        [torch.tensor([0.5, 1.0, -1.0])],
        [torch.tensor([2.0, 0.0, 1.0])],
    ]
    warmed = []
    for name, method in REGISTRY.items():
        if method.spec.group_names is not None or not availability(method.spec)[0]:
            continue
        spec = parse_method({"name": name, **method.warm_up})
        if method.aggregate is not None:
            aggregate(spec, grads, names, torch.empty(3))
        else:
            solve(spec, gram if method.spec.needs_gram else None, names, None)
        warmed.append(name)
    return warmed
