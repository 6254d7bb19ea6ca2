"""Parsed bodies -> the engine's tensor groups: PROTOCOL.md's rules on groups, keys and order, then views.

Each tensor is a flat view of the request buffer on CPU, or of one host-to-device copy of its data region
on CUDA: the engine works on flat tensors, and the shapes travel beside them for the reply's layout. The
rules checked here are the wire's (group names, keys, order, shapes that agree between groups, one float
dtype to view the bytes as); the engine (`engine/validate.py`) checks the rest, for every caller.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch
from gradweight import wire
from gradweight.blocks import Packed
from gradweight.errors import InvalidGradients
from gradweight.methods import PAIR

from .decode import TORCH_DTYPES, Parsed, Source, Span

Views = dict[tuple[int, int], torch.Tensor]  # each span's tensor by its bytes [begin, end)
DECIMAL_KEY = re.compile(r"(0|[1-9][0-9]*)\Z")


@dataclass
class Assembled:
    """Groups ready for the engine, and what the reply needs to lay out the result."""

    groups: dict[str, Sequence[torch.Tensor]]
    keys: list[str]
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    numel: int


def assemble(parsed: Parsed, device: torch.device) -> Assembled:
    """Apply the group, key and order rules, then view each tensor in place (or on `device`); `shapes`
    and `numel` are the first group's. A body whose header was seen before (`parsed.memo`) reuses the
    rules' outcome and the cut of its data: only the views are new."""
    if parsed.memo is not None and device.type == "cpu":
        plan = parsed.memo.get("plan")
        if plan is None:
            plan = parsed.memo["plan"] = _Plan.of(parsed)
        return plan.assemble(parsed)
    rules = _Rules.of(parsed)
    return rules.assembled(parsed, _views(parsed, rules.names, device), device)


@dataclass(frozen=True)
class _Rules:
    """The outcome of PROTOCOL.md's rules for one body: groups in order, keys in order, shapes, dtype."""

    names: list[str]
    keys: list[str]
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    numel: int

    @classmethod
    def of(cls, parsed: Parsed) -> _Rules:
        present = parsed.tensors
        if parsed.groups is not None:
            names = parsed.groups
            missing = [g for g in names if g not in present]
            if missing:
                raise InvalidGradients(f"group {missing[0]!r} is listed in `groups` but has no tensors")
            extra = [g for g in present if g not in names]
            if extra:
                raise InvalidGradients(f"tensors of group {extra[0]!r}, which `groups` does not list")
        else:
            extra = [g for g in present if g not in PAIR]
            if extra:
                raise InvalidGradients(f"group {extra[0]!r} needs the `groups` entry listing every group")
            names = [g for g in PAIR if g in present]
        if not names:
            raise InvalidGradients("no gradients: expected groups 'forget' and 'retain'")
        for g in names:
            if not present[g]:
                raise InvalidGradients(f"group {g!r} is empty")
        first = present[names[0]]
        for g in names[1:]:
            other = present[g]
            if other.keys() != first.keys():
                diff = sorted(set(first) ^ set(other))[0]
                raise InvalidGradients(
                    f"groups {names[0]!r} and {g!r} differ in their keys (e.g. {diff[:80]!r})"
                )
        keys = _ordered_keys(list(first), parsed.order)
        dtype = _one_dtype(present, names)
        shapes = [tuple(first[k].shape) for k in keys]
        for g in names[1:]:
            theirs = [tuple(present[g][k].shape) for k in keys]
            if theirs != shapes:
                key, a, b = next((k, a, b) for k, a, b in zip(keys, shapes, theirs) if a != b)
                raise InvalidGradients(f"key {key!r}: shape {b} in group {g!r} differs from {a}")
        numel = sum(math.prod(s) for s in shapes)
        if numel == 0:
            raise InvalidGradients("the gradients have no elements")
        return cls(names, keys, shapes, dtype, numel)

    def assembled(self, parsed: Parsed, views: Views, device: torch.device) -> Assembled:
        present = parsed.tensors
        groups: dict[str, Sequence[torch.Tensor]] = {
            g: [
                src.reshape(-1).to(device) if isinstance(src, torch.Tensor) else views[src.begin, src.end]
                for src in (present[g][k] for k in self.keys)
            ]
            for g in self.names
        }
        return Assembled(groups, self.keys, self.shapes, self.dtype, self.numel)


@dataclass(frozen=True)
class _Plan:
    """A header's rules and the cut of its data, kept with the header (decode's layout cache): a request
    with the same header makes only its views, one `torch.split` per region. `regions` is None where a
    region is not aligned to its itemsize (it must be moved first: `_views` does)."""

    rules: _Rules
    regions: list[tuple[int, int, torch.dtype, list[int]]] | None
    index: dict[str, list[int]]
    packed: dict[str, tuple[int, int]] | None  # each group's bytes, where each lies back to back in key order
    sizes: list[int]

    @classmethod
    def of(cls, parsed: Parsed) -> _Plan:
        rules = _Rules.of(parsed)
        spans = sorted(
            (s for g in rules.names for s in parsed.tensors[g].values() if isinstance(s, Span)),
            key=attrgetter("begin"),
        )
        regions: list[tuple[int, int, torch.dtype, list[int]]] | None = []
        position: dict[tuple[int, int], int] = {}
        start = 0
        for i, span in enumerate(spans):
            if i + 1 == len(spans) or spans[i + 1].begin != span.end:
                region = spans[start : i + 1]
                dtype = TORCH_DTYPES[region[0].dtype]
                sizes = [(s.end - s.begin) // dtype.itemsize for s in region]
                if regions is not None and region[0].begin % dtype.itemsize == 0:
                    regions.append((region[0].begin, span.end, dtype, sizes))
                else:
                    regions = None
                for s in region:
                    position[s.begin, s.end] = len(position)
                start = i + 1
        spans_of = parsed.tensors
        index = {g: [position[_where(spans_of[g][k])] for k in rules.keys] for g in rules.names}
        sizes = [math.prod(shape) for shape in rules.shapes]
        return cls(rules, regions, index, _packed(parsed, rules) if regions is not None else None, sizes)

    def assemble(self, parsed: Parsed) -> Assembled:
        if self.regions is None:
            cpu = torch.device("cpu")
            return self.rules.assembled(parsed, _views(parsed, self.rules.names, cpu), cpu)
        host = torch.frombuffer(parsed.buffer, dtype=torch.uint8)
        r = self.rules
        if self.packed is not None:
            packs: dict[str, Sequence[torch.Tensor]] = {
                g: Packed(host[b:e].view(r.dtype), self.sizes) for g, (b, e) in self.packed.items()
            }
            return Assembled(packs, r.keys, r.shapes, r.dtype, r.numel)
        pieces: list[torch.Tensor] = []
        for begin, end, dtype, sizes in self.regions:
            pieces.extend(torch.split(host[begin:end].view(dtype), sizes))
        groups: dict[str, Sequence[torch.Tensor]] = {g: [pieces[i] for i in self.index[g]] for g in r.names}
        return Assembled(groups, r.keys, r.shapes, r.dtype, r.numel)


def _packed(parsed: Parsed, rules: _Rules) -> dict[str, tuple[int, int]] | None:
    """Each group's bytes [begin, end) where every group's tensors lie back to back in key order, as
    gradweight's client sends them; None otherwise."""
    out: dict[str, tuple[int, int]] = {}
    for g in rules.names:
        spans = [_where(parsed.tensors[g][k]) for k in rules.keys]
        if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
            return None
        out[g] = (spans[0][0], spans[-1][1])
    return out


def _where(src: Source) -> tuple[int, int]:
    """A span's bytes: the key of its view (`begin` alone is shared by an empty tensor and the next)."""
    assert isinstance(src, Span)
    return src.begin, src.end


def _one_dtype(present: dict[str, dict[str, Source]], names: list[str]) -> torch.dtype:
    """The one float dtype of every tensor of the groups; InvalidGradients naming a culprit otherwise."""
    kinds = {src.dtype for g in names for src in present[g].values()}
    if len(kinds) == 1 and next(iter(kinds)) in TORCH_DTYPES:
        return TORCH_DTYPES[kinds.pop()]  # type: ignore[index]
    dtypes = {_dtype_of(src, g, k) for g in names for k, src in present[g].items()}
    if len(dtypes) > 1:
        raise InvalidGradients(f"mixed dtypes {sorted(_name(d) for d in dtypes)}: use one float dtype")
    return dtypes.pop()


def _name(dtype: torch.dtype | str) -> str:
    """The protocol's name of a torch dtype or a safetensors tag: "float32", never "torch.float32"/"F32"."""
    if isinstance(dtype, str):
        return wire.DTYPES[dtype][1] if dtype in wire.DTYPES else dtype
    return str(dtype).removeprefix("torch.")


def _dtype_of(src: Source, group: str, key: str) -> torch.dtype:
    if isinstance(src, torch.Tensor):
        return src.dtype
    if src.dtype not in TORCH_DTYPES:
        name = _name(src.dtype)
        raise InvalidGradients(f"group {group!r} key {key[:80]!r}: dtype {name} is not a float type")
    return TORCH_DTYPES[src.dtype]


def _views(parsed: Parsed, names: list[str], device: torch.device) -> Views:
    """Every span's tensor, keyed by its bytes (begin, end).

    Spans that follow each other without a gap form a region (the data of one safetensors file); each region
    is viewed as one typed tensor and cut with one `torch.split`, which makes thousands of views far faster
    than slicing them one by one. On CUDA the bytes from the first to the last span go to the device in one
    copy first. A region whose start is not aligned to the itemsize (a multipart part can start anywhere)
    would give misaligned views: on CPU it is moved down to the aligned offset below it, over the bytes of
    its part's already parsed header (no second copy of the data: multipart used to peak at 2.45 bytes per
    body byte); on CUDA, or where there is no room, it is copied once.
    """
    spans = sorted(
        (s for g in names for s in parsed.tensors[g].values() if isinstance(s, Span)), key=lambda s: s.begin
    )
    if not spans:
        return {}
    host = torch.frombuffer(parsed.buffer, dtype=torch.uint8)
    shift = 0
    data = host
    if device.type != "cpu":
        shift = spans[0].begin
        data = host[shift : spans[-1].end].to(device)
    movable = memoryview(parsed.buffer) if device.type == "cpu" else None
    out: Views = {}
    region: list[Span] = []
    floor = 0
    for span in spans:
        if region and span.begin != region[-1].end:
            out.update(_cut(data, region, shift, movable, floor))
            floor = region[-1].end
            region = []
        region.append(span)
    out.update(_cut(data, region, shift, movable, floor))
    return out


def _cut(data: torch.Tensor, region: list[Span], shift: int, movable: memoryview | None, floor: int) -> Views:
    dtype = TORCH_DTYPES[region[0].dtype]
    begin, end = region[0].begin - shift, region[-1].end - shift
    skew = begin % dtype.itemsize
    if skew and movable is not None and begin - skew >= floor:
        movable[begin - skew : end - skew] = movable[begin:end]
        raw = data[begin - skew : end - skew]
    elif skew:
        raw = data[begin:end].clone()
    else:
        raw = data[begin:end]
    typed = raw.view(dtype)
    sizes = [(s.end - s.begin) // dtype.itemsize for s in region]
    return dict(zip(((s.begin, s.end) for s in region), torch.split(typed, sizes)))


def _ordered_keys(keys: list[str], order: list[str] | None) -> list[str]:
    if order is not None:
        if len(order) != len(keys) or set(order) != set(keys):
            raise InvalidGradients("`order` must list every key exactly once")
        return order
    if not all(DECIMAL_KEY.match(k) for k in keys):
        bad = next(k for k in keys if not DECIMAL_KEY.match(k))
        raise InvalidGradients(f"key {bad[:80]!r} is not a decimal integer and no `order` metadata is given")
    return sorted(keys, key=int)
