"""`GradientWeightingMethodRemote`: vision_unlearning's `GradientWeightingMethod`, served by gradweight.

vision_unlearning's trainers (`UnlearnerLora` and its subclasses) are pydantic models whose field
`gradient_weighting_method: GradientWeightingMethod` accepts only instances of that class, so the drop-in
*is* one: a pydantic subclass whose fields say where and how to weight (server URL, method spec, mode,
timeout, retries) and whose `weight_grads` returns what upstream's class for that method returns
(`[N, 1]` for munba, `[N]` otherwise, on `accelerator.device`, in the gradients' dtype). In a config:

    gradient_weighting_method=GradientWeightingMethodRemote(url="http://gpu-box:8000", method="munba")

vision-unlearning declares very heavy dependencies (diffusers, jax, ...) that its `gradient_weighting`
module does not use, so gradweight never depends on it: this module imports it, and says what to install
when it is missing (`pip install --no-deps vision-unlearning==1.0.0`, plus torch).

Mixed precision: an fp16 step whose loss scale overflowed has inf gradients. Upstream's munba then returns
NaN and accelerate's GradScaler skips the step; the server refuses such input (422 non-finite), which
would end the run. So by default non-finite inputs give a NaN gradient (a warning is logged and
`nonfinite_steps` counts them); `on_nonfinite="raise"` raises `NonFinite` instead. The check is a pass
that reads the data anyway: the server's gram in full mode (the rare overflowing step costs its upload),
the local gram in gram mode; only `none` in gram mode, which must ignore the retain group as upstream does,
checks the forget group itself.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, SerializeAsAny, field_validator

from .client import DEFAULT_TIMEOUT, Client
from .errors import InvalidMethod, NonFinite
from .methods import MethodSpec, parse_method
from .remote import RemoteWeighting
from .tensors import require_torch
from .types import CombineResult, Mode

try:
    from vision_unlearning.utils.gradient_weighting import GradientWeightingMethod
except ImportError as exc:
    raise ImportError(
        "gradweight.vision_unlearning needs vision_unlearning's gradient_weighting module (and torch): "
        "pip install --no-deps vision-unlearning==1.0.0  (that module imports only pydantic and torch; "
        f"--no-deps skips the package's heavy dependencies). Import failed with: {exc}"
    ) from exc

__all__ = ["GradientWeightingMethodRemote"]

log = logging.getLogger("gradweight")
DEFAULT_URL = "http://127.0.0.1:8000"


def _default_url() -> str:
    return os.environ.get("GRADWEIGHT_URL", DEFAULT_URL)


class GradientWeightingMethodRemote(GradientWeightingMethod):  # type: ignore[misc]
    """The gradient weighting of a vision_unlearning trainer, computed by a gradweight server.

    `method` is a spec (`gradweight.Munba()`, `gradweight.Nash(max_norm=1.0)`, ...) or a name / JSON text
    (`"munba"`); `token` falls back to `GRADWEIGHT_TOKEN` and `url` defaults to `GRADWEIGHT_URL`. The
    token is a credential, not configuration: `model_dump()` leaves it out and `==` ignores it, so a
    dumped config validates back into an equal object. The HTTP client is made on first use; `close()`
    (or `with`) releases it, and a later call makes a new one.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(default_factory=_default_url, description="Base URL of the gradweight server.")
    method: SerializeAsAny[MethodSpec] = Field(
        description="The weighting: a gradweight method spec, or its name ('munba', 'nash', ...)."
    )
    token: SecretStr | None = Field(
        default=None, exclude=True, description="Bearer token; default: $GRADWEIGHT_TOKEN. Never dumped."
    )
    mode: Mode = Field(
        default="full",
        description="'full': the server gets the gradients and returns the combination; 'gram': only "
        "the 2x2 gram goes over the wire and the weighted sum is formed locally.",
    )
    timeout: float | None = Field(default=DEFAULT_TIMEOUT, gt=0, description="Seconds per request.")
    retries: int | None = Field(
        default=None,
        ge=0,
        description="Most retries of connection failures and 503s; None: the client's default (retry for "
        "up to 60 s, through a restart of the server).",
    )
    on_nonfinite: Literal["nan", "raise"] = Field(
        default="nan",
        description="Non-finite gradients (fp16 overflow): 'nan' returns a NaN gradient for the "
        "GradScaler to skip; 'raise' raises gradweight.NonFinite.",
    )

    _remote: RemoteWeighting | None = PrivateAttr(default=None)
    _nonfinite: int = PrivateAttr(default=0)

    @field_validator("method", mode="before")
    @classmethod
    def _parse_method(cls, value: Any) -> MethodSpec:
        try:
            return parse_method(value)
        except InvalidMethod as exc:
            raise ValueError(exc.detail) from None

    # ---- the upstream call ------------------------------------------------------------------------
    def weight_grads(
        self, grads_forget: Sequence[Any], grads_retain: Sequence[Any], accelerator: Any = None
    ) -> Any:
        """Upstream's signature and result; `accelerator` may be None (then the gradients' device)."""
        forget, retain = list(grads_forget), list(grads_retain)
        # The server's gram (full mode) or the local one (gram mode) finds non-finite inputs: no pass here,
        # except for `none` in gram mode, whose gram would read the retain group that upstream ignores.
        if self.method.name == "none" and self.mode == "gram" and not _all_finite(forget):
            return self._non_finite(forget, accelerator, "a gradient holds inf or NaN")
        try:
            out = self._weighting().weight_grads(forget, retain, accelerator)
        except NonFinite as exc:
            return self._non_finite(forget, accelerator, str(exc))
        dtype = forget[0].dtype
        return out if out.dtype == dtype else out.to(dtype)

    def _non_finite(self, forget: list[Any], accelerator: Any, why: str) -> Any:
        if self.on_nonfinite == "raise":
            raise NonFinite(f"{why} (on_nonfinite='raise')")
        self._nonfinite += 1
        log.warning(
            "gradweight: non-finite gradients (%s); returning a NaN gradient so the step is skipped "
            "(%d such steps so far)",
            why,
            self._nonfinite,
        )
        torch = require_torch()
        device = accelerator.device if accelerator is not None else forget[0].device
        n = sum(int(g.numel()) for g in forget)
        shape = (n, 1) if self.method.name == "munba" else (n,)
        return torch.full(shape, math.nan, dtype=forget[0].dtype, device=device)

    # ---- run-time state, kept out of the configuration --------------------------------------------
    @property
    def nonfinite_steps(self) -> int:
        """Calls answered with a NaN gradient because their inputs were not finite."""
        return self._nonfinite

    @property
    def last(self) -> CombineResult | None:
        """The latest full result (weights, gram, timing, request id), None before the first call."""
        return self._remote.last if self._remote is not None else None

    def _weighting(self) -> RemoteWeighting:
        if self._remote is None:
            token = self.token.get_secret_value() if self.token else os.environ.get("GRADWEIGHT_TOKEN")
            client = Client(self.url, token=token or None, timeout=self.timeout, retries=self.retries)
            self._remote = RemoteWeighting(client, self.method, mode=self.mode)
        return self._remote

    def close(self) -> None:
        """Close the HTTP client (a later call opens a new one; a stateful method starts afresh)."""
        if self._remote is not None:
            self._remote.client.close()
            self._remote = None

    def __enter__(self) -> GradientWeightingMethodRemote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __eq__(self, other: object) -> bool:
        """Equal configurations: same class and the same dumped fields (the token is not one)."""
        if not isinstance(other, GradientWeightingMethodRemote):
            return NotImplemented
        return type(self) is type(other) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def __copy__(self) -> GradientWeightingMethodRemote:
        """A copy shares no client (closing one must not close the other's)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        new: GradientWeightingMethodRemote = type(self).model_construct(
            _fields_set=set(self.model_fields_set), **fields
        )
        return new

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> GradientWeightingMethodRemote:
        return self.__copy__()  # every field is immutable (str, float, frozen spec, SecretStr)

    def __getstate__(self) -> dict[Any, Any]:
        state = dict(super().__getstate__())
        state["__pydantic_private__"] = {"_remote": None, "_nonfinite": 0}
        return state


def _all_finite(grads: list[Any]) -> bool:
    """One fused pass (the total norm, one device sync) in the common case; an overflowing norm of
    finite but huge values is told apart by an exact check."""
    torch = require_torch()
    with torch.no_grad():
        total = getattr(torch.nn.utils, "get_total_norm", None)
        if total is not None and math.isfinite(float(total(grads, norm_type=2.0))):
            return True
        return all(bool(torch.isfinite(g).all()) for g in grads)
