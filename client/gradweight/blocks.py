"""The torch side of the blocked passes, shared by the server's engine and gram mode's host gram.

A group of gradients is reduced to its flat runs (`flat_runs`): consecutive tensors that lie back to back
in one storage become one view, so a group read from a request body, or a trainer's flat gradient bucket,
costs a few calls whatever its tensor count (a `Packed` group is one run by construction). The groups are
then walked in stretches of a fixed width (`chunks`); a stretch spanning many small tensors is filled with
one `torch.cat`, not one copy per tensor. With `threads` > 1 both passes hand their stretches out to that
many threads (`share`), with the same bytes as one thread.

`blocked_combine` writes the weighted sum once into a flat output, stretch by stretch, with the seed's
rounding. `blocked_gram` is the CPU gram: each stretch of the k groups is copied into a k x lanes float64
scratch (exact widening), cut into blocks of `BATCH` lanes, and one batched matmul gives every block's
k x k partial gram (each a small float64 GEMM that one thread computes whole, in the kernel's fixed order);
the partials are added block-wise and folded pairwise at the end. Products of inputs up to float32 are
exact in float64, so each entry is within about (BATCH + numel / lanes + log2 lanes) float64 roundings of
its exact value relative to sqrt(K_ii K_jj); the lane count depends on k and numel only, never on threads,
and the bytes do not depend on how the tensors lie in memory. Measured 3x faster than the elementwise lane
scheme (`gram.lanes_gram`, which stays the GPU's path); the two agree to float64 rounding.

Imported only where torch is installed.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, overload

import torch

CPU_BLOCK = 1 << 18  # the combine's stretch, in elements
CUDA_BLOCK = 1 << 21  # also the combine's scratch on the GPU: 8 MiB of float32
LANES = 1 << 16  # k = 2: 1 MiB of float64 scratch; fewer lanes for more groups (SCRATCH)
SCRATCH = 1 << 17  # lanes x k at most
BATCH = 1 << 10  # the GEMM's reduction length per block
SHARE_WIDTH = 1 << 20  # a shared combine's item, in elements
PARTIALS_BYTES = 4 << 20  # a shared gram's partials held at once, before they are added in order
T = TypeVar("T")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


class Packed(Sequence[torch.Tensor]):
    """A group whose tensors lie back to back, in order, in one flat tensor (a request body's group): the
    passes take `flat` as the group's one run, and the per-tensor flat views are cut (one `torch.split`)
    only if something asks for them, such as an error naming a key. Cutting 256 views and merging them
    back cost more than the LoRA step's gram."""

    __slots__ = ("_views", "flat", "sizes")

    def __init__(self, flat: torch.Tensor, sizes: list[int]) -> None:
        self.flat = flat
        self.sizes = sizes
        self._views: tuple[torch.Tensor, ...] | None = None

    def views(self) -> tuple[torch.Tensor, ...]:
        if self._views is None:
            self._views = torch.split(self.flat, self.sizes)
        return self._views

    def __len__(self) -> int:
        return len(self.sizes)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[torch.Tensor]: ...
    def __getitem__(self, i: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        return self.views()[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.views())


def flat_runs(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A group's tensors as flat pieces, in order, with consecutive ones that lie back to back in one
    storage merged into one view: a group read from a request body is one piece, so its cost does not grow
    with its tensor count. Empty tensors are dropped."""
    if isinstance(tensors, Packed):
        return [tensors.flat] if tensors.flat.numel() else []
    itemsize = tensors[0].element_size()
    sizes = [t.numel() for t in tensors]
    if not all(sizes):
        tensors = [t for t, n in zip(tensors, sizes) if n]  # an empty view's data_ptr is 0
        sizes = [n for n in sizes if n]
    ptrs = [t.data_ptr() for t in tensors]
    adjacent = [p + n * itemsize == q for p, n, q in zip(ptrs, sizes, ptrs[1:])]
    if not any(adjacent):
        return [_flat(t) for t in tensors]
    runs: list[torch.Tensor] = []
    i, count = 0, len(tensors)
    while i < count:
        j = i + 1
        head = _flat(tensors[i])
        if j < count and adjacent[i]:
            room = head.untyped_storage().nbytes() // itemsize - head.storage_offset()
            size = sizes[i]
            while j < count and adjacent[j - 1] and size + sizes[j] <= room:
                t = tensors[j]
                if t.dtype != head.dtype or not t.is_contiguous():
                    break
                size += sizes[j]
                j += 1
            if j > i + 1:
                head = head.as_strided((size,), (1,))
        runs.append(head)
        i = j
    return runs


def chunks(
    groups: Sequence[Sequence[torch.Tensor]], width: int
) -> Iterator[tuple[int, int, list[list[torch.Tensor]]]]:
    """Consecutive stretches of `width` elements of k flat groups (lists of flat pieces of the same total
    length; the pieces' boundaries may differ from group to group): (start, length, each group's pieces
    covering the stretch). Only pieces cut by a stretch's edge are sliced; the others are found by
    bisection, so a stretch costs a few calls, not one per piece."""
    sizes = [[p.numel() for p in g] for g in groups]
    ends = [list(itertools.accumulate(n)) for n in sizes]
    total = ends[0][-1] if ends[0] else 0
    for start in range(0, total, width):
        stop = min(start + width, total)
        yield start, stop - start, [_cover(*g, start, stop) for g in zip(groups, sizes, ends)]


def _cover(
    pieces: Sequence[torch.Tensor], sizes: list[int], ends: list[int], start: int, stop: int
) -> list[torch.Tensor]:
    """The pieces, or slices of them, holding elements [start, stop) of their group."""
    i = bisect.bisect_right(ends, start)
    j = bisect.bisect_left(ends, stop, i)
    at_i, at_j = ends[i] - sizes[i], ends[j] - sizes[j]
    if i == j:
        return [pieces[i] if stop - start == sizes[i] else pieces[i][start - at_i : stop - at_i]]
    head = pieces[i] if start == at_i else pieces[i][start - at_i :]
    tail = pieces[j] if stop == ends[j] else pieces[j][: stop - at_j]
    return [head, *pieces[i + 1 : j], tail]


def fill(dst: torch.Tensor, pieces: list[torch.Tensor], stage: torch.Tensor | None) -> None:
    """Copy the pieces, end to end, into `dst` (exact: a copy at most widens); `stage`, of the pieces'
    dtype, takes a multi-piece cat first when `dst` is wider (cat's own widening is about 2x slower)."""
    if len(pieces) == 1:
        dst.copy_(pieces[0])
    elif pieces[0].dtype == dst.dtype or stage is None:
        torch.cat(pieces, out=dst)
    else:
        s = stage[: dst.numel()]
        torch.cat(pieces, out=s)
        dst.copy_(s)


class _GramScratch:
    """One thread's k x lanes float64 lanes (and the staging for a widening cat) for a stretch's partial."""

    def __init__(self, k: int, lanes: int, dtype: torch.dtype) -> None:
        self.x = torch.empty(k, lanes, dtype=torch.float64)
        self.xb = self.x.view(k, lanes // BATCH, BATCH).transpose(0, 1)
        self.xt = self.xb.transpose(1, 2)
        self.stage = torch.empty(lanes, dtype=dtype) if dtype != torch.float64 else None

    def partial(self, n: int, parts: list[list[torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
        """Each block's k x k partial gram of one stretch of `n` elements, into `out`."""
        for i, pieces in enumerate(parts):
            fill(self.x[i, :n], pieces, self.stage)
        if n < self.x.shape[1]:
            self.x[:, n:].zero_()
        return torch.bmm(self.xb, self.xt, out=out)


def blocked_gram(groups: Sequence[Sequence[torch.Tensor]], threads: int = 1) -> torch.Tensor:
    """The upper triangle (row by row, float64) of the gram of k groups of flat pieces (`flat_runs`).
    With `threads` > 1 the stretches' partials are computed by that many threads (`share`), a window of
    PARTIALS_BYTES at a time, and added in stretch order, as one thread adds them: the same bytes."""
    k = len(groups)
    numel = sum(p.numel() for p in groups[0])
    cap = min(LANES, 1 << ((SCRATCH // k).bit_length() - 1), 1 << max(0, numel - 1).bit_length())
    lanes = max(BATCH, cap)
    blocks = lanes // BATCH
    dtype = groups[0][0].dtype
    acc = torch.zeros(blocks, k, k, dtype=torch.float64)
    if threads > 1 and numel > lanes:
        stretches = list(chunks(groups, lanes))
        window = max(threads, PARTIALS_BYTES // (blocks * k * k * 8))
        partials = torch.empty(min(window, len(stretches)), blocks, k, k, dtype=torch.float64)
        mine = threading.local()

        def one(i: int) -> None:
            if not hasattr(mine, "scratch"):
                mine.scratch = _GramScratch(k, lanes, dtype)
            _, n, parts = stretches[i]
            mine.scratch.partial(n, parts, partials[i % window])

        for start in range(0, len(stretches), window):
            done = range(start, min(start + window, len(stretches)))
            share(done, one, threads)
            for i in done:
                acc.add_(partials[i % window])
    else:
        scratch, part = _GramScratch(k, lanes, dtype), torch.empty_like(acc)
        for _, n, parts in chunks(groups, lanes):
            acc.add_(scratch.partial(n, parts, part))
    width = blocks
    while width > 1:
        half = width // 2
        acc[:half].add_(acc[half:width])
        width = half
    rows, cols = torch.triu_indices(k, k)
    return acc[0][rows, cols]


def blocked_combine(
    runs: Sequence[Sequence[torch.Tensor]], weights: Sequence[float], out: torch.Tensor, threads: int = 1
) -> torch.Tensor:
    """Write `sum_i weights[i] * flat(runs[i])` once into the flat tensor `out`, stretch by stretch
    (`blocks.chunks`), as round(w_0 g_0), then round(acc + round(w_i g_i)) for each further group, never
    fused: for two groups the seed's `fw * cat(f) + rw * cat(r)` bit for bit. Summed in `out`'s dtype when
    that is float32 or wider and at least the inputs' width, else in float32 (or the inputs' dtype when
    wider) and rounded once into `out`. With `threads` > 1 on the CPU, that many threads share the
    stretches (`share`); each element is computed alike wherever it is."""
    if threads > 1 and out.device.type == "cpu" and out.numel() > SHARE_WIDTH:
        items = list(chunks(runs, SHARE_WIDTH))
        share(items, lambda it: blocked_combine(it[2], weights, out[it[0] : it[0] + it[1]]), threads)
        return out
    in_dtype = runs[0][0].dtype
    work = torch.promote_types(torch.promote_types(in_dtype, out.dtype), torch.float32)
    block = CUDA_BLOCK if out.device.type == "cuda" else CPU_BLOCK
    size = min(block, out.numel())
    tmp = torch.empty(size, dtype=work, device=out.device) if len(runs) > 1 else None
    acc = None if work == out.dtype else torch.empty(size, dtype=work, device=out.device)
    stage = torch.empty(size, dtype=in_dtype, device=out.device) if in_dtype != work else None

    def scaled_into(o: torch.Tensor, pieces: list[torch.Tensor], w: float) -> None:
        if len(pieces) == 1 and pieces[0].dtype == o.dtype and w != 1.0:
            torch.mul(pieces[0], w, out=o)
            return
        fill(o, pieces, stage)
        if w != 1.0:
            o.mul_(w)

    for start, n, parts in chunks(runs, block):
        o = out[start : start + n]
        a = o if acc is None else acc[:n]
        scaled_into(a, parts[0], weights[0])
        for pieces, w in zip(parts[1:], weights[1:], strict=True):
            if w == 1.0 and len(pieces) == 1 and pieces[0].dtype == a.dtype:
                a.add_(pieces[0])
                continue
            assert tmp is not None
            t = tmp[:n]
            scaled_into(t, pieces, w)
            a.add_(t)
        if acc is not None:
            o.copy_(a)
    return out


_END = object()
_HELPERS: dict[int, ThreadPoolExecutor] = {}
_HELPERS_LOCK = threading.Lock()


def _helpers(n: int) -> ThreadPoolExecutor:
    with _HELPERS_LOCK:
        pool = _HELPERS.get(n)
        if pool is None:
            pool = _HELPERS[n] = ThreadPoolExecutor(
                n, thread_name_prefix="gradweight-pass", initializer=torch.set_num_threads, initargs=(1,)
            )
        return pool


def share(items: Sequence[T], fn: Callable[[T], object], threads: int) -> None:
    """`fn` on every item, by the calling thread and `threads - 1` helper threads, each taking the next
    item when it is free, each running torch on one thread. An OpenMP team meets at every operation, so a
    descheduled member stalls each one; here it holds back only the item it has. On 2 cores this took the
    munba step at 10M parameters from 40 ms (two OpenMP threads, passive) to 32, and with the other core
    busy it stayed at one thread's time where OpenMP's got slower. An error stops the others at their
    next item and is raised here."""
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    lock = threading.Lock()
    queue = iter(items)
    failed = threading.Event()

    def work() -> None:
        while not failed.is_set():
            with lock:
                item = next(queue, _END)
            if item is _END:
                return
            try:
                fn(item)  # type: ignore[arg-type]
            except BaseException:
                failed.set()
                raise

    futures = [_helpers(threads - 1).submit(work) for _ in range(threads - 1)]
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work()
    finally:
        torch.set_num_threads(caller)
        for f in futures:
            if not f.cancel():
                f.exception()
    for f in futures:
        err = None if f.cancelled() else f.exception()
        if err is not None:
            raise err
