"""Optional transfer progress bars (tqdm, the `progress` extra), shown only for large bodies."""

from __future__ import annotations

from typing import Protocol

PROGRESS_THRESHOLD = 8 * 1024 * 1024


class Progress(Protocol):
    def update(self, n: int) -> object: ...
    def close(self) -> None: ...


class _Null:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


NULL: Progress = _Null()


def bar(total: int, desc: str, enabled: bool, threshold: int = PROGRESS_THRESHOLD) -> Progress:
    """A byte-counting bar when `enabled` and the transfer is over `threshold` bytes; a no-op otherwise."""
    if not enabled or total < threshold:
        return NULL
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress bars need tqdm: pip install 'gradweight[progress]'") from None
    bar_: Progress = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    return bar_
