"""Helpers the torchjd-backed methods share: seeding, preference vectors and the state envelope.

torchjd's weightings are fed our float64 gram; their weights go back through `methods.solve`, which alone
maps a failure or a non-finite weight to Degenerate.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from gradweight.errors import InvalidMethod
from gradweight.methods import MethodSpec, PrefVector

SEED_MODULUS = 2**63
_RNG_LOCK = threading.Lock()


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run torchjd's draws from the global CPU generator seeded with `seed`, then restore it.

    torchjd draws from the global CPU generator, so seeded calls are serialised by a lock; CUDA
    generators are not touched. `None` leaves the global generator alone (a fresh random draw).
    """
    if seed is None:
        yield
        return
    with _RNG_LOCK:
        saved = torch.default_generator.get_state()
        torch.default_generator.manual_seed(seed % SEED_MODULUS)
        try:
            yield
        finally:
            torch.default_generator.set_state(saved)


def by_group(spec: MethodSpec, what: str, value: PrefVector, names: Sequence[str]) -> torch.Tensor | None:
    """A per-group vector option in gram order (a list must have one entry per group; a dict name each)."""
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) != set(names):
            raise InvalidMethod(
                f"{spec.name}: {what} names groups {sorted(value)}, the request has {sorted(names)}"
            )
        values = [value[n] for n in names]
    else:
        if len(value) != len(names):
            raise InvalidMethod(f"{spec.name}: {what} has {len(value)} entries for {len(names)} groups")
        values = list(value)
    return torch.tensor(values, dtype=torch.float64)


def pref_tensor(spec: MethodSpec, pref: PrefVector, names: Sequence[str]) -> torch.Tensor | None:
    return by_group(spec, "pref_vector", pref, names)


def check_state(
    state: Any, method: str, names: Sequence[str], fields: Sequence[str]
) -> dict[str, Any] | None:
    """The incoming state envelope, or None to start fresh; InvalidMethod when it belongs elsewhere."""
    if state is None:
        return None
    if not isinstance(state, dict) or any(f not in state for f in ("method", "groups", "step", *fields)):
        raise InvalidMethod(f"{method}: `state` is not a state this server produced for {method!r}")
    if state["method"] != method:
        raise InvalidMethod(f"{method}: `state` was produced by method {state['method']!r}")
    if list(state["groups"]) != list(names):
        raise InvalidMethod(
            f"{method}: `state` was produced for groups {list(state['groups'])}, this request has "
            f"{list(names)}; send no state to start fresh"
        )
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidMethod(f"{method}: `state.step` must be a non-negative integer")
    return state


def envelope(spec: MethodSpec, names: Sequence[str], step: int, **fields: Any) -> dict[str, Any]:
    """The state a stateful method hands back for its next step."""
    return {"method": spec.name, "groups": list(names), "step": step, **fields}


def finite_tensor(value: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A state entry as a finite float64 tensor of `shape`; InvalidMethod otherwise."""
    try:
        m = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InvalidMethod(f"`state.{what}` is not numbers") from None
    if tuple(m.shape) != shape or not bool(torch.isfinite(m).all()):
        dims = " x ".join(str(d) for d in shape)
        raise InvalidMethod(f"`state.{what}` must be finite, of shape {dims}")
    return m


def finite_matrix(value: Any, k: int, what: str) -> torch.Tensor:
    return finite_tensor(value, (k, k), what)


def finite_state(t: torch.Tensor | None, method: str, what: str) -> list[Any]:
    """A tensor the next state carries, as JSON numbers; the state must stay finite."""
    if t is None or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{method}: the state's {what} is not finite for these gradients")
    return list(t.to(torch.float64).tolist())
