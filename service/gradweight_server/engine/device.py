"""Which device the engine computes on."""

from __future__ import annotations

import torch


def resolve_device(setting: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` / `cuda:N` insist on a GPU."""
    setting = setting.strip().lower()
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {setting!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {setting!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type != "cpu":
        raise RuntimeError(f"unsupported device {setting!r}: use auto, cpu, cuda or cuda:N")
    return device
