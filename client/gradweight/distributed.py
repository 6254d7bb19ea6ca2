"""One server request per training step for trainers on torch.distributed, whatever the number of ranks.

Replicated gradients (DDP: after its all-reduce every rank holds the same gradients): the asking rank
calls the server alone and broadcasts its answer; every rank ends with the same bytes. In `mode="full"`
the combined gradient itself is broadcast, in `mode="gram"` only the weights, which each rank then
applies to its own (identical) gradients with the same deterministic sum.

Sharded gradients (FSDP, FSDP2/DTensor, ZeRO: each rank holds a slice of every group): each rank forms
its slice's partial gram in float64 with the client's gram pass, one all_reduce(SUM) gives the full
k x k gram, the asking rank calls /v1/weights, the weights (and a stateful method's next `state`) are
broadcast, and each rank combines its own slice, in place when `out=` is given. The wire carries k x k
numbers whatever the model size.

No rank is left waiting: a failure on any rank (bad input, a server error, a timeout) is sent to every
rank of the group in the same collectives a success would use, and each rank raises it. Every wait is
bounded: the asking rank's request by `timeout`, the others' wait for its answer by twice that. After a
`StepTimeout` the process group may be out of step: end the job (torchrun restarts it).

torch is imported when a function here runs, never when `gradweight` is imported.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from . import errors
from . import gram as _gram
from .client import AsyncClient, Client, MethodLike
from .errors import APIError, GradweightError
from .tensors import Gradients, Group, as_group, require_torch
from .types import Array, CombineResult, Layout, Mode, WeightsResult

T = TypeVar("T")
DEFAULT_TIMEOUT = 600.0
PAIR = ("retain", "forget")

__all__ = ["DEFAULT_TIMEOUT", "StepTimeout", "acombine", "combine"]


class StepTimeout(GradweightError, TimeoutError):
    """A rank waited longer than the step's timeout: for the server's answer, or for another rank."""


@dataclass
class _Step:
    """One step's shared half (sans-I/O): arguments, group order, collectives; the twins do the asking."""

    process_group: Any
    src: int
    rank: int
    timeout: float
    names: list[str]
    group_arg: list[str] | None
    method: MethodLike
    layout: Layout
    dtype: str | None
    out: Sequence[Array] | None
    sharded: bool
    mode: Mode
    inputs: dict[str, Any]  # forget, retain, groups and state as passed
    gram: list[list[float]] | None = None

    @classmethod
    def of(
        cls,
        forget: Gradients | None,
        retain: Gradients | None,
        method: MethodLike | None,
        *,
        groups: Mapping[str, Gradients] | None,
        sharded: bool,
        mode: Mode,
        layout: Layout,
        dtype: str | None,
        state: str | None,
        out: Sequence[Array] | None,
        process_group: Any,
        src: int,
        timeout: float,
    ) -> _Step:
        """Checks what every rank passes alike, before any collective, so a mistake fails on each rank."""
        require_torch()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        if method is None:
            raise ValueError("method is required, e.g. 'munba' or gradweight.Nash()")
        if mode not in ("full", "gram"):
            raise ValueError(f"mode must be 'full' or 'gram', not {mode!r}")
        if layout not in ("flat", "params"):
            raise ValueError(f"layout must be 'flat' or 'params', not {layout!r}")
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if groups is not None:
            if forget is not None or retain is not None:
                raise ValueError("pass forget/retain or groups=, not both")
            names, group_arg = [str(n) for n in groups], [str(n) for n in groups]
        else:
            if forget is None:
                raise ValueError("forget gradients are required")
            names = list(PAIR) if retain is not None else ["forget"]
            group_arg = None
        if sharded and len(names) < 2:
            raise ValueError("sharded gradients need at least two groups (forget and retain)")
        size = dist.get_world_size(process_group)
        if not 0 <= src < size:
            raise ValueError(f"src must be a rank of the group (0..{size - 1}), not {src}")
        rank = dist.get_rank(process_group)
        inputs = {"forget": forget, "retain": retain, "groups": groups, "state": state}
        return cls(
            process_group,
            src,
            rank,
            timeout,
            names,
            group_arg,
            method,
            layout,
            dtype,
            out,
            sharded,
            mode,
            inputs,
        )

    @property
    def asking(self) -> bool:
        return self.rank == self.src

    # ---- the step: prepare (every rank), ask (the asking rank, sync or async), finish (every rank) ---
    def prepare(self) -> None:
        """Sharded: this rank's partial gram, summed over the group (every rank, before anyone asks)."""
        if self.sharded:
            try:
                parts, failure = _gram.gram(self.ordered()), None
            except Exception as exc:
                parts, failure = None, exc
            self.gram = self.reduce(parts, failure)

    def ask(self, client: Client | AsyncClient) -> Any:
        """The one request of the step: a result, or a coroutine for an AsyncClient."""
        i = self.inputs
        if self.sharded:
            return client.weights(self.gram, self.method, groups=self.group_arg, state=i["state"])
        return client.combine(
            i["forget"],
            i["retain"],
            self.method,
            groups=i["groups"],
            layout=self.layout,
            dtype=self.dtype,
            mode=self.mode,
            state=i["state"],
        )

    def finish(self, got: Any, failure: BaseException | None) -> CombineResult:
        """Shares the asking rank's answer (or failure) and forms this rank's result."""
        answer = None
        if self.asking and failure is None:
            try:
                answer = (
                    _Answer(got, self.gram)
                    if self.sharded
                    else _Answer.of(got, with_shapes=self.mode == "full")
                )
            except Exception as exc:
                failure = exc
        shared = self.share(answer, failure)
        if self.sharded:
            return self.weighted(self.ordered(), shared)
        if shared.shapes is not None:  # full mode: the combined gradient itself
            return self.spread(got if self.asking else None, shared)
        if self.asking:  # gram mode: the asking rank's own local sum is what every rank forms
            if self.out is not None:
                _copy_into(got, self.out)
            mine: CombineResult = got
            return mine
        return replace(self.weighted(self.ordered(), shared), timing=dict(shared.timing or {}))

    # ---- collectives, each bounded -------------------------------------------------------------
    def _wire_device(self) -> Any:
        """Where small tensors go for the backend: the host, unless the backend takes only device tensors."""
        torch = require_torch()
        import torch.distributed as dist

        backend = str(dist.get_backend(self.process_group)).lower()
        if "gloo" in backend or "mpi" in backend or "cpu:" in backend:
            return torch.device("cpu")
        acc = torch.accelerator.current_accelerator()
        return torch.device(acc.type, torch.accelerator.current_device_index()) if acc else "cpu"

    def _wait(self, work: Any, seconds: float, what: str) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=seconds))
        except RuntimeError as exc:  # gloo and NCCL raise their timeouts as RuntimeError subclasses
            raise StepTimeout(f"rank {self.rank}: {what} did not complete within {seconds:g} s") from exc

    def _broadcast(self, tensor: Any, seconds: float, what: str) -> None:
        import torch.distributed as dist

        work = dist.broadcast(tensor, group=self.process_group, group_src=self.src, async_op=True)
        self._wait(work, seconds, what)

    def reduce(self, local: list[list[float]] | None, failure: BaseException | None) -> list[list[float]]:
        """The full gram, summed over ranks in float64; one extra slot per rank says whether it failed,
        so a rank whose slice was bad stops every rank instead of leaving them in the collective."""
        torch = require_torch()
        import torch.distributed as dist

        k = len(self.names)
        size = dist.get_world_size(self.process_group)
        buf = torch.zeros(k * k + size, dtype=torch.float64, device=self._wire_device())
        if failure is None and local is not None:
            buf[: k * k] = torch.tensor(local, dtype=torch.float64).reshape(-1)
        else:
            buf[k * k + self.rank] = 1.0
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
        self._wait(work, self.timeout, "the gram all_reduce")
        host = buf.cpu()
        failed = [r for r in range(size) if host[k * k + r].item() != 0.0]
        if failure is not None:
            raise failure
        if failed:
            raise GradweightError(f"ranks {failed} could not form their partial gram (see their errors)")
        rows: list[list[float]] = host[: k * k].reshape(k, k).tolist()
        return rows

    def share(self, answer: _Answer | None, failure: BaseException | None) -> _Answer:
        """The asking rank's answer (or its failure) on every rank; raises the failure everywhere."""
        torch = require_torch()
        device = self._wire_device()
        if self.asking:
            payload = _encode(answer, failure)
            length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        else:
            length = torch.zeros(1, dtype=torch.int64, device=device)
        # the others also wait out the asking rank's request, hence twice the timeout
        seconds = self.timeout if self.asking else 2 * self.timeout
        self._broadcast(length, seconds, "the asking rank's answer")
        if self.asking:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        else:
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        self._broadcast(data, self.timeout, "the asking rank's answer")
        value, error = _decode(data.cpu().numpy().tobytes())
        if failure is not None:
            raise failure
        if error is not None:
            raise error
        assert value is not None
        return value

    # ---- the local half of the results ---------------------------------------------------------------
    def ordered(self) -> list[Group]:
        i = self.inputs
        named: Mapping[str, Any] = i["groups"] if i["groups"] is not None else i
        return [as_group(named[n], n) for n in self.names]

    def weighted(self, ordered: list[Group], answer: _Answer) -> CombineResult:
        """This rank's weighted sum of its own gradients: its slice, or all of them when replicated."""
        w = answer.weights
        missing = [n for n in self.names if n not in w.weights]
        if missing:
            raise GradweightError(f"weights reply lacks groups {missing}")
        weights = [w.weights[n] for n in self.names]
        flat: Array | None = None
        per_key: dict[str, Array] = {}
        if self.out is not None:
            _into(ordered, weights, self.out)
        else:
            flat, per_key = _gram.combine(ordered, weights, layout=self.layout, dtype=self.dtype)
        return answer.result(flat, per_key, str(ordered[0].arrays[0].device))

    def spread(self, mine: CombineResult | None, answer: _Answer) -> CombineResult:
        """Replicated full mode: the asking rank's combined gradient, broadcast as bytes to every rank."""
        torch = require_torch()
        assert answer.shapes is not None
        assert answer.dtype is not None
        if mine is not None:
            pieces = [mine.scaled_grad] if mine.scaled_grad is not None else mine.tensors
            flat = torch.cat([p.reshape(-1) for p in pieces]) if len(pieces) > 1 else pieces[0].reshape(-1)
            flat = flat.contiguous()
        else:
            device = self.ordered()[0].arrays[0].device
            numel = sum(_numel(s) for s in answer.shapes.values())
            flat = torch.empty(numel, dtype=getattr(torch, answer.dtype), device=device)
        self._broadcast(flat.view(torch.uint8), self.timeout, "the combined gradient")
        if mine is None:
            views, pos = {}, 0
            for key, shape in answer.shapes.items():
                views[key] = flat[pos : pos + _numel(shape)].view(shape)
                pos += _numel(shape)
            if self.layout == "flat":
                mine = answer.result(flat, {}, str(device))
            else:
                mine = answer.result(None, views, str(device))
        if self.out is not None:
            _copy_into(mine, self.out)
        return mine


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the asking rank sends the others: the weights reply, and in replicated full mode the combined
    gradient's dtype and shapes (its bytes follow in a collective of their own)."""

    weights: WeightsResult
    gram: list[list[float]] | None = None
    timing: dict[str, float] | None = None
    mode: Mode = "gram"
    dtype: str | None = None
    shapes: dict[str, tuple[int, ...]] | None = None

    @classmethod
    def of(cls, res: CombineResult, *, with_shapes: bool) -> _Answer:
        weights: Any = res.weights  # None for methods that have no weights (elementwise ones)
        w = WeightsResult(method=res.method, weights=weights, state=res.state, request_id=res.request_id)
        shapes = None
        dtype = None
        if with_shapes:
            items = {"scaled_grad": res.scaled_grad} if res.scaled_grad is not None else res.params
            shapes = {k: tuple(int(d) for d in v.shape) for k, v in items.items()}
            dtype = str(next(iter(items.values())).dtype).removeprefix("torch.")
        return cls(w, res.gram, dict(res.timing), res.mode, dtype, shapes)

    def to_json(self) -> dict[str, Any]:
        w = self.weights
        return {
            "weights": {
                "method": w.method,
                "weights": w.weights,
                "state": w.state,
                "request_id": w.request_id,
            },
            "gram": self.gram,
            "timing": self.timing,
            "mode": self.mode,
            "dtype": self.dtype,
            "shapes": self.shapes,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> _Answer:
        shapes = obj["shapes"]
        return cls(
            WeightsResult(**obj["weights"]),
            obj["gram"],
            obj["timing"],
            obj["mode"],
            obj["dtype"],
            None if shapes is None else {k: tuple(v) for k, v in shapes.items()},
        )

    def result(self, flat: Array | None, per_key: dict[str, Array], device: str) -> CombineResult:
        w = self.weights
        return CombineResult(
            weights=w.weights,
            method=w.method,
            scaled_grad=flat,
            params=per_key,
            gram=self.gram,
            device=device,
            timing=dict(self.timing or {}),
            state=w.state,
            request_id=w.request_id,
            mode=self.mode,
        )


def _encode(answer: _Answer | None, failure: BaseException | None) -> bytes:
    """The asking rank's answer or failure as JSON: data only, so no rank ever unpickles another's bytes."""
    if failure is None:
        assert answer is not None
        return json.dumps({"ok": answer.to_json()}).encode()
    error: dict[str, Any] = {"type": type(failure).__name__, "detail": str(failure)}
    if isinstance(failure, APIError):
        error.update(detail=failure.detail, request_id=failure.request_id, retry_after=failure.retry_after)
    return json.dumps({"error": error}).encode()


def _decode(data: bytes) -> tuple[_Answer | None, BaseException | None]:
    """The other side of `_encode`: the same exception class for the package's errors and Python's
    built-in ones, a GradweightError carrying the class name for anything else."""
    obj = json.loads(data)
    if "ok" in obj:
        return _Answer.from_json(obj["ok"]), None
    e = obj["error"]
    name, detail = str(e["type"]), str(e["detail"])
    if name == StepTimeout.__name__:
        return None, StepTimeout(detail)
    cls = getattr(errors, name, None) or getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, APIError):
        return None, cls(detail, request_id=e.get("request_id"), retry_after=e.get("retry_after"))
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return None, cls(detail)
        except Exception:
            pass
    return None, GradweightError(f"{name}: {detail}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _into(ordered: Sequence[Group], weights: Sequence[float], out: Sequence[Array]) -> None:
    """out[t] = sum_i weights[i] * group_i[t], in place; `out[t]` may be one of the groups' own tensors
    (a parameter's .grad holding one group): that term is scaled first, the others added to it."""
    torch = require_torch()
    n = len(ordered[0].arrays)
    if len(out) != n:
        raise ValueError(f"out= has {len(out)} tensors for {n} gradients")
    with torch.no_grad():
        for t, dst in enumerate(out):
            terms = [(g.arrays[t].detach(), w) for g, w in zip(ordered, weights, strict=True)]
            if tuple(dst.shape) != tuple(terms[0][0].shape):
                raise ValueError(
                    f"out[{t}] has shape {tuple(dst.shape)}, the gradients {tuple(terms[0][0].shape)}"
                )
            work = (
                dst
                if dst.dtype.itemsize >= 4
                else torch.empty(dst.shape, dtype=torch.float32, device=dst.device)
            )
            alias = next((i for i, (x, _) in enumerate(terms) if _same(x, dst)), None)
            if alias is not None and work is dst:
                dst.mul_(terms[alias][1])
                rest = [term for i, term in enumerate(terms) if i != alias]
            else:
                torch.mul(terms[0][0].to(work.dtype), terms[0][1], out=work)
                rest = terms[1:]
            for x, w in rest:
                work.add_(x.to(work.dtype), alpha=w)
            if work is not dst:
                dst.copy_(work)


def _same(a: Any, b: Any) -> bool:
    return bool(a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _copy_into(res: CombineResult, out: Sequence[Array]) -> None:
    torch = require_torch()
    with torch.no_grad():
        if res.scaled_grad is not None:
            flat, pos = res.scaled_grad.reshape(-1), 0
            total = sum(o.numel() for o in out)
            if flat.numel() != total:
                raise ValueError(f"the combined gradient has {flat.numel()} elements, out= {total}")
            for o in out:
                o.copy_(flat[pos : pos + o.numel()].view(o.shape))
                pos += o.numel()
            return
        pieces = res.tensors
        if len(pieces) != len(out):
            raise ValueError(f"out= has {len(out)} tensors for {len(pieces)} gradients")
        for o, p in zip(out, pieces, strict=True):
            o.copy_(p.view(o.shape))


def _bounded(call: Callable[[], T], seconds: float) -> T:
    """`call()` in a helper thread, given up after `seconds`: a blocking client cannot hang the step."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="gradweight-step", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StepTimeout(f"the server did not answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def combine(
    client: Client,
    forget: Gradients | None = None,
    retain: Gradients | None = None,
    method: MethodLike | None = None,
    *,
    groups: Mapping[str, Gradients] | None = None,
    sharded: bool = False,
    mode: Mode = "full",
    layout: Layout = "flat",
    dtype: str | None = None,
    state: str | None = None,
    out: Sequence[Array] | None = None,
    process_group: Any = None,
    src: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
) -> CombineResult:
    """`Client.combine` for a step of a torch.distributed job; every rank of `process_group` calls it.

    Replicated gradients (the default, DDP): rank `src` of the group asks the server (`mode` as in
    `Client.combine`), the others get its answer by broadcast. `sharded=True` (FSDP, ZeRO): the
    arguments are this rank's slice of every group (e.g. the local shards of each group's gradients);
    one all_reduce forms the gram and rank `src` asks /v1/weights. `out=` (one tensor per gradient, e.g.
    the parameters' .grad or their local shards) receives the combined gradient in place. Pass the
    previous result's `.state` for stateful methods: every rank gets the same one.
    """
    step = _Step.of(
        forget,
        retain,
        method,
        groups=groups,
        sharded=sharded,
        mode=mode,
        layout=layout,
        dtype=dtype,
        state=state,
        out=out,
        process_group=process_group,
        src=src,
        timeout=timeout,
    )
    step.prepare()
    got: Any = None
    failure: BaseException | None = None
    if step.asking:
        try:
            got = _bounded(lambda: step.ask(client), timeout)
        except Exception as exc:
            failure = exc
    return step.finish(got, failure)


async def acombine(
    client: AsyncClient,
    forget: Gradients | None = None,
    retain: Gradients | None = None,
    method: MethodLike | None = None,
    *,
    groups: Mapping[str, Gradients] | None = None,
    sharded: bool = False,
    mode: Mode = "full",
    layout: Layout = "flat",
    dtype: str | None = None,
    state: str | None = None,
    out: Sequence[Array] | None = None,
    process_group: Any = None,
    src: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
) -> CombineResult:
    """The async twin of `combine`: collectives and local passes run in a worker thread, so the loop
    stays free while the ranks wait for each other."""
    step = _Step.of(
        forget,
        retain,
        method,
        groups=groups,
        sharded=sharded,
        mode=mode,
        layout=layout,
        dtype=dtype,
        state=state,
        out=out,
        process_group=process_group,
        src=src,
        timeout=timeout,
    )
    await asyncio.to_thread(step.prepare)
    got: Any = None
    failure: BaseException | None = None
    if step.asking:
        try:
            got = await asyncio.wait_for(step.ask(client), timeout)
        except asyncio.TimeoutError:
            failure = StepTimeout(f"the server did not answer within {timeout:g} s")
        except Exception as exc:
            failure = exc
    return await asyncio.to_thread(step.finish, got, failure)
