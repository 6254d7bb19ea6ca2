"""Write the three small safetensors files that the README's curl examples send.

`forget.safetensors` and `retain.safetensors` hold one group each (tensors named 0, 1, 2, shapes [3, 4],
[5] and [2, 2, 2]); `grads.safetensors` holds both as `forget/<key>` and `retain/<key>`. The values are
small exact binary fractions, so the files are the same bytes on every machine; the copies shipped in
examples/data/ are these (tests/server/test_server_readme.py checks it). Needs numpy and safetensors only.

    .venv/bin/python examples/curl_files.py [DIR]     # default: examples/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SHAPES = [(3, 4), (5,), (2, 2, 2)]
FILES = ("forget.safetensors", "retain.safetensors", "grads.safetensors")


def groups() -> dict[str, list[np.ndarray]]:
    """forget and retain, cosine about -0.12: both `munba` and `nash` are defined for them."""
    out: dict[str, list[np.ndarray]] = {"forget": [], "retain": []}
    start = 0
    for shape in SHAPES:
        i = np.arange(start, start + int(np.prod(shape)), dtype=np.float32)
        out["forget"].append(((i % 7 - 3) / 4).reshape(shape))
        out["retain"].append(((i * 3 % 5 - 2) / 2 - (i % 7 - 3) / 16).reshape(shape))
        start += int(np.prod(shape))
    return out


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    g = groups()
    for name in ("forget", "retain"):
        save_file({str(k): a for k, a in enumerate(g[name])}, str(directory / f"{name}.safetensors"))
    both = {f"{name}/{k}": a for name in ("forget", "retain") for k, a in enumerate(g[name])}
    save_file(both, str(directory / "grads.safetensors"))
    return [directory / f for f in FILES]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else Path(__file__).resolve().parent / "data"
    for path in write(directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
