"""The elementwise pass and its two methods beyond the torchjd oracle cases: the trimmed mean's partition
networks, blocks spanning many small tensors, GradDrop keeping torchjd's groups at every group count
(its P rounds as torchjd's), and the same bytes at any thread count."""

from __future__ import annotations

import pytest
import torch
from gradweight.methods import parse_method
from gradweight_server.engine import run
from gradweight_server.engine.elementwise import ALIGN, CPU_MIN_WIDTH, width
from gradweight_server.engine.methods.trimmed_mean import partition, partitioned_rows
from torchjd.aggregation import GradDrop, TrimmedMean


def split(j: torch.Tensor, sizes: list[int]) -> dict[str, list[torch.Tensor]]:
    return {f"task{i}": list(row.split(sizes)) for i, row in enumerate(j)}


def odd_sizes(n_small: int, large: int, seed: int) -> list[int]:
    """Many tensors of 0..300 elements around one larger than a block: blocks span tensors both ways."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 300, (n_small,), generator=gen).tolist()
    return [*small[: n_small // 2], large, *small[n_small // 2 :]]


def test_partition_networks_leave_the_trimmed_values_apart() -> None:
    for n in range(1, 18):
        for t in range((n + 1) // 2):
            x = torch.cat([torch.randint(-2, 3, (n, 300)).float(), torch.randn(n, 300)], dim=1)
            rows = partitioned_rows(x.clone(), torch.empty(600), t)
            got = torch.sort(torch.stack(rows), dim=0).values
            want = torch.sort(x, dim=0).values
            for lo, hi in ((0, t), (t, n - t), (n - t, n)):
                part = torch.sort(torch.stack(rows[lo:hi]), dim=0).values if hi > lo else got[:0]
                assert torch.equal(part, want[lo:hi]), (n, t, lo)
            assert len(partition(n, t)) <= n * n


@pytest.mark.parametrize("k", [3, 6])
def test_blocks_spanning_many_small_tensors(k: int) -> None:
    sizes = odd_sizes(400, 3 * width(k, torch.device("cpu")) + 5, seed=k)
    j = (
        torch.randn(k, sum(sizes), generator=torch.Generator().manual_seed(k))
        * torch.arange(1, k + 1)[:, None]
    )
    groups = split(j, sizes)
    for t in range((k + 1) // 2):
        got = run(parse_method({"name": "trimmed_mean", "trim_number": t}), groups).flat
        want = TrimmedMean(t)(j)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    got = run(parse_method({"name": "graddrop", "seed": 4}), groups).flat
    torch.manual_seed(4)
    want = GradDrop()(j)
    assert bool(((got != 0) == (want != 0)).all())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("k", [2, 4, 5, 8, 33])
def test_graddrop_keeps_torchjd_groups_at_any_group_count(k: int) -> None:
    """P is torchjd's to the bit (aligned blocks sum as its whole-matrix sums), so no coordinate whose P
    falls within rounding of its U keeps the other sign; and the kept values sum as torchjd adds them."""
    sizes = [70_001, 3, 65_537, 40_000]
    j = torch.randn(k, sum(sizes), generator=torch.Generator().manual_seed(100 + k))
    j[0] *= 20.0  # one dominant group: P close to 0 or 1, far from the U of most coordinates
    got = run(parse_method({"name": "graddrop", "seed": 2**40 + k}), split(j, sizes)).flat
    torch.manual_seed(2**40 + k)
    want = GradDrop()(j)
    assert bool(((got != 0) == (want != 0)).all())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    if k < 32:  # torch sums up to 31 rows in order, as torchjd's loop adds: the same bits but the tail
        tail = sum(sizes) % ALIGN
        assert torch.equal(got[: sum(sizes) - tail], want[: sum(sizes) - tail])


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "trimmed_mean", "trim_number": 1},
        {"name": "trimmed_mean", "trim_number": 0},
        {"name": "graddrop", "seed": 1},
    ],
)
@pytest.mark.parametrize("k", [3, 6, 33])
def test_same_bytes_at_any_thread_count(spec: dict[str, object], k: int) -> None:
    sizes = [CPU_MIN_WIDTH * 3 + 7, 1, 50_001]
    j = torch.randn(k, sum(sizes), generator=torch.Generator().manual_seed(k))
    groups = split(j, sizes)
    method = parse_method(spec)
    before = torch.get_num_threads()
    seen = set()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            seen.add(run(method, groups).flat.numpy().tobytes())
            assert width(k, torch.device("cpu")) % ALIGN == 0
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 1
