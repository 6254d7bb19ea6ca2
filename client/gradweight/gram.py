"""Gram mode: the trainer computes K = G Gᵀ itself and sends only k x k numbers.

CPU torch tensors take the server's CPU scheme, `gradweight.blocks.blocked_gram` (batched float64 GEMMs over
an exactly widened scratch, lanes fixed by k and numel only), so gram mode's gram has the bytes of the
server's full-mode CPU gram on the same machine for the same tensors, whatever either side's threads (the
host passes run on one: `one_thread`).
CUDA tensors take the server's GPU scheme (`lanes_gram` with `TorchLanes`), numpy arrays (or no torch) the
same lane scheme in single-threaded numpy (`NumpyLanes`): both are deterministic and within about 1e-14 of
exact relative to sqrt(K_ii K_jj), but only the first shares the server's CPU bytes (its blocked sums
round in another order).
The weighted sum is formed locally, on the gradients' own device, straight into the output: torch tensors
stretch by stretch over their flat runs (a stretch of many small tensors is one cat, then one scale), with
the server's rounding, so for two groups it is the seed's `fw * cat(f) + rw * cat(r)` bit for bit. For CPU
float32/float64 tensors gram mode copies the first group once, in one call, into a fresh flat tensor that
both passes read and the sum then overwrites (`torch_runs(copy_first=True)`): its scattered tensors are
read once, and only the other groups' tensors are viewed one by one from Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .tensors import Group, device_of, dtype_name, is_torch, torch_or_none
from .types import Array

CPU_LANES = 1 << 14  # k = 2: the copies stay below torch's 32768-element parallel grain
CUDA_LANES = 1 << 20
CPU_SCRATCH = 1 << 19
CUDA_SCRATCH = 1 << 22
MIN_LANES = 1 << 8
NUMPY_FLOATS = ("float16", "float32", "float64")


def lanes_for(k: int, numel: int, cuda: bool = False) -> int:
    """The lane count of the blocked gram: a power of two fixed by k, the size and the device only (never
    by threads). The float64 scratch (k values and k(k+1)/2 accumulators per lane) stays within a few MiB
    and within about 6 percent of one float32 group."""
    per_lane = k + k * (k + 1) // 2
    cap = min(CUDA_LANES if cuda else CPU_LANES, (CUDA_SCRATCH if cuda else CPU_SCRATCH) // per_lane)
    target = min(cap, max(MIN_LANES, numel // (32 * per_lane)))
    return 1 << max(0, target.bit_length() - 1)


def _check(groups: Sequence[Group]) -> None:
    first = groups[0]
    shapes = [a.shape for a in first.arrays]
    for g in groups[1:]:
        if len(g.arrays) != len(first.arrays):
            raise ValueError("every group needs the same number of tensors")
        if [a.shape for a in g.arrays] == shapes:  # the usual case, one comparison
            continue
        for a, b in zip(g.arrays, first.arrays, strict=True):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"shape mismatch between groups: {tuple(a.shape)} vs {tuple(b.shape)}")


def _on_device(a: Array) -> bool:
    return is_torch(a) and a.device.type != "cpu"


class NumpyLanes:
    """Host arithmetic for `lanes_gram`: single-threaded numpy (bfloat16 tensors widened by torch)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def new(self, rows: int) -> Any:
        return np.zeros((rows, self.lanes), dtype=np.float64)

    def put(self, dst: Any, src: Array) -> None:
        if isinstance(src, np.ndarray):
            np.copyto(dst, src, casting="unsafe")
        else:  # a bfloat16 CPU tensor: torch converts
            torch = torch_or_none()
            assert torch is not None
            torch.from_numpy(dst).copy_(src)

    def muladd(self, acc: Any, x: Any, xs: Any, prod: Any) -> None:
        np.multiply(x, xs, out=prod)
        np.add(acc, prod, out=acc)

    def add(self, acc: Any, other: Any) -> None:
        np.add(acc, other, out=acc)


class TorchLanes:
    """Device (or server) arithmetic for `lanes_gram`: torch elementwise operations, each one IEEE
    operation per element, so how torch splits them across threads changes no bit."""

    def __init__(self, lanes: int, device: Any, exact_products: bool) -> None:
        self.lanes, self.device, self.exact_products = lanes, device, exact_products

    def new(self, rows: int) -> Any:
        torch = torch_or_none()
        assert torch is not None
        return torch.zeros((rows, self.lanes), dtype=torch.float64, device=self.device)

    def put(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def muladd(self, acc: Any, x: Any, xs: Any, prod: Any) -> None:
        if self.exact_products:  # x * xs is exact in float64: one rounding, fused or not
            acc.addcmul_(x, xs)
        else:  # a float64 product rounds: multiply, then add, never fused
            torch = torch_or_none()
            assert torch is not None
            torch.mul(x, xs, out=prod)
            acc.add_(prod)

    def add(self, acc: Any, other: Any) -> None:
        acc.add_(other)


def lanes_gram(keys: Iterable[Sequence[Any]], k: int, ops: NumpyLanes | TorchLanes) -> list[float]:
    """The upper triangle (row by row) of the gram of k flat arrays per key, by the lane scheme above."""
    lanes = ops.lanes
    x, acc, prod = ops.new(k), ops.new(k * (k + 1) // 2), ops.new(k)
    starts = [i * k - i * (i - 1) // 2 for i in range(k)]

    def accumulate(m: int) -> None:
        for i in range(k):
            ops.muladd(acc[starts[i] : starts[i] + k - i, :m], x[i : i + 1, :m], x[i:, :m], prod[: k - i, :m])

    fill = 0
    for flats in keys:
        n = int(flats[0].shape[0])
        s = 0
        while s < n:
            take = min(lanes - fill, n - s)
            for i, f in enumerate(flats):
                ops.put(x[i, fill : fill + take], f[s : s + take])
            fill += take
            s += take
            if fill == lanes:
                accumulate(lanes)
                fill = 0
    if fill:
        accumulate(fill)
    width = lanes
    while width > 1:
        half = width // 2
        ops.add(acc[:, :half], acc[:, half:width])
        width = half
    upper: list[float] = acc[:, 0].tolist()
    return upper


def gram(groups: Sequence[Group], runs: list[list[Any]] | None = None) -> list[list[float]]:
    """K[i][j] = <flat(group i), flat(group j)>, exact to float64 rounding; groups share keys and shapes.

    numpy arrays are summed by single-threaded numpy on cache-sized lanes: trainers' CPUs are busy, and
    thread pools on many small operations under contention cost far more than they save. `runs`: the
    groups' `torch_runs`, when the caller has them."""
    _check(groups)
    k = len(groups)
    a0 = groups[0].arrays[0]
    runs = torch_runs(groups) if runs is None else runs
    if runs is not None and a0.device.type == "cpu":
        from .blocks import blocked_gram

        torch = torch_or_none()
        assert torch is not None
        with torch.no_grad(), one_thread():
            upper = blocked_gram(runs).tolist() if runs[0] else [0.0] * (k * (k + 1) // 2)
        return _from_upper(upper, k)
    numel = int(groups[0].numel)
    keys = range(len(groups[0].arrays))
    if not _on_device(a0):
        host = (tuple(_host_flat(g.arrays[t]) for g in groups) for t in keys)
        return _from_upper(lanes_gram(host, k, NumpyLanes(lanes_for(k, numel))), k)
    torch = torch_or_none()
    assert torch is not None
    ops = TorchLanes(lanes_for(k, numel, cuda=True), a0.device, exact_products=a0.dtype != torch.float64)
    with torch.no_grad():
        device = (tuple(g.arrays[t].detach().reshape(-1) for g in groups) for t in keys)
        return _from_upper(lanes_gram(device, k, ops), k)


@contextlib.contextmanager
def one_thread(on: bool = True) -> Iterator[None]:
    """Run the host passes on one torch thread, then restore the count. Their bytes do not depend on
    threads, but their speed does, badly: each pass is a few hundred small operations, and under load an
    OpenMP team waits for a descheduled thread at every one of them (on 2 shared cores, 2 threads made the
    LoRA step's gram 4.4 ms -> 40-80 ms, p90 250 ms). The count is process-wide in torch, so torch work
    in another thread during the pass runs on one thread too."""
    torch = torch_or_none()
    n = torch.get_num_threads() if on and torch is not None else 1
    if n == 1:
        yield
        return
    assert torch is not None
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def can_copy_first(a0: Array, dtype: str | None) -> bool:
    """Whether gram mode may sum into a copy of the first group (`torch_runs(copy_first=True)`): CPU
    float32/float64 tensors, summed and returned in their own dtype."""
    if not is_torch(a0) or a0.device.type != "cpu":
        return False
    name = dtype_name(a0)
    return name in ("float32", "float64") and dtype in (None, name)


def torch_runs(groups: Sequence[Group], *, copy_first: bool = False) -> list[list[Any]] | None:
    """Each group's tensors as flat runs (`blocks.flat_runs`), None for numpy input; torch input must be
    of one dtype on one device, as the server asks of full mode's. An empty group has no run. The runs are
    views made under `no_grad` (the passes only read them), so nothing needs detaching.

    `copy_first` (where `can_copy_first`): the first group's run is instead one fresh flat copy of it,
    made in one call (`_flat_copy`), which gram mode's combine then overwrites with its result."""
    a0 = groups[0].arrays[0]
    if not is_torch(a0):
        return None
    from .blocks import flat_runs

    torch = torch_or_none()
    assert torch is not None
    dtype, device = a0.dtype, a0.device
    cpu = device.type == "cpu"
    runs: list[list[Any]] = []
    for g in groups:
        odd = [a for a in g.arrays if a.dtype != dtype or (not a.is_cpu if cpu else a.device != device)]
        if odd:  # a numpy array among tensors fails the dtype test
            got = f"{dtype_name(odd[0])} on {device_of(odd[0])}"
            raise ValueError(f"every gradient needs one dtype on one device: {dtype} on {device}, {got}")
        if not any(a.numel() for a in g.arrays):
            runs.append([])
            continue
        with torch.no_grad():
            runs.append([_flat_copy(g.arrays)] if copy_first and not runs else flat_runs(g.arrays))
    return runs


def _flat_copy(tensors: list[Any]) -> Any:
    """The tensors end to end in a new flat tensor: torch's own flatten views and copies them in C++, which
    at LoRA sizes (256 small tensors) costs half of a Python view per tensor plus a cat."""
    torch = torch_or_none()
    assert torch is not None
    if len(tensors) == 1:
        return tensors[0].reshape(-1).clone()  # flatten would return a view of a single tensor
    return torch._C._nn.flatten_dense_tensors(tensors)


def _from_upper(upper: list[float], k: int) -> list[list[float]]:
    rows = [[0.0] * k for _ in range(k)]
    n = 0
    for i in range(k):
        for j in range(i, k):
            rows[i][j] = rows[j][i] = upper[n]
            n += 1
    return rows


def _host_flat(a: Array) -> Array:
    """A flat view: numpy for numpy arrays and for CPU tensors numpy can read (not bfloat16)."""
    if isinstance(a, np.ndarray):
        return a.reshape(-1)
    flat = a.detach().reshape(-1)
    return flat if dtype_name(flat) not in NUMPY_FLOATS else flat.numpy()


def combine(
    groups: Sequence[Group],
    weights: Sequence[float],
    *,
    layout: str,
    dtype: str | None,
    runs: list[list[Any]] | None = None,
    kept: Any | None = None,
) -> tuple[Array | None, dict[str, Array]]:
    """sum_i weights[i] * group_i, as one flat vector or one tensor per key (views of one flat vector for
    torch input). Written straight into the output when it has the inputs' dtype; inputs narrower than
    float32 are summed in float32 and rounded once. `kept`: the first group's run when it is a fresh copy
    (`torch_runs(copy_first=True)`); the sum is then written over it in place."""
    runs = torch_runs(groups) if runs is None else runs
    if runs is None:
        return _combine_numpy(groups, weights, layout=layout, dtype=dtype)
    torch = torch_or_none()
    assert torch is not None
    from .blocks import blocked_combine

    first = groups[0]
    a0 = first.arrays[0]
    if kept is not None:
        flat = kept
    else:
        numel = sum(p.numel() for p in runs[0])
        flat = torch.empty(numel, dtype=getattr(torch, dtype) if dtype else a0.dtype, device=a0.device)
    if runs[0]:
        with torch.no_grad(), one_thread(a0.device.type == "cpu"):
            blocked_combine(runs, weights, flat)
    if layout == "flat":
        return flat, {}
    pieces = flat.split([a.numel() for a in first.arrays])
    return None, {key: p.view(a.shape) for key, p, a in zip(first.keys, pieces, first.arrays, strict=True)}


def _combine_numpy(
    groups: Sequence[Group], weights: Sequence[float], *, layout: str, dtype: str | None
) -> tuple[Array | None, dict[str, Array]]:
    first = groups[0]
    in_dtype = np.asarray(first.arrays[0]).dtype
    out_dtype = np.dtype(dtype) if dtype else in_dtype
    work = np.dtype(np.float32) if in_dtype.itemsize < 4 else in_dtype

    def into(t: int, out: Any) -> None:
        """out = sum_i w_i * group_i[t], out of the work dtype and the tensor's shape."""
        np.multiply(groups[0].arrays[t], weights[0], out=out, casting="unsafe")
        for g, w in zip(groups[1:], weights[1:], strict=True):
            out += np.multiply(g.arrays[t], w, dtype=work)

    if layout == "params":
        per_key = {}
        for t, key in enumerate(first.keys):
            out = np.empty(np.shape(first.arrays[t]), dtype=work)
            into(t, out)
            per_key[key] = out.astype(out_dtype, copy=False)
        return None, per_key
    flat = np.empty(first.numel, dtype=out_dtype)
    pos = 0
    for t, a in enumerate(first.arrays):
        size = int(np.size(a))
        if work == out_dtype:
            into(t, flat[pos : pos + size].reshape(np.shape(a)))
        else:
            tmp = np.empty(np.shape(a), dtype=work)
            into(t, tmp)
            flat[pos : pos + size] = tmp.reshape(-1)
        pos += size
    return flat, {}
