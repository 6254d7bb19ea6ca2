"""The package stays thin: importing it pulls in no server framework and not torch; progress is opt-in."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import numpy as np
import pytest
from client_fakes import FakeServer
from gradweight import Client, progress


def test_import_is_thin() -> None:
    code = (
        "import sys, gradweight, gradweight.cli\n"
        "heavy = {'torch', 'fastapi', 'uvicorn', 'starlette', 'gradweight_server', 'vision_unlearning'}\n"
        "heavy &= set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "print(len(gradweight.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 20


def test_numpy_round_trip_without_torch_imported(fake: FakeServer) -> None:
    code = (
        "import sys, httpx, numpy as np\n"
        "sys.path.insert(0, 'tests/client')\n"
        "from client_fakes import FakeServer\n"
        "import gradweight as gw\n"
        "c = gw.Client('http://x', transport=httpx.MockTransport(FakeServer()))\n"
        "rng = np.random.default_rng(1)\n"
        "f, r = [rng.standard_normal(5)], [rng.standard_normal(5)]\n"
        "res = c.combine(f, r, 'simple', mode='gram')\n"
        "res2 = c.combine(f, r, 'simple', layout='params')\n"
        "assert np.allclose(res.scaled_grad, f[0] + r[0]) and np.allclose(res2.tensors[0], f[0] + r[0])\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_progress_bar_opt_in(fake: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    seen: list[tuple[int, str]] = []
    real_bar = progress.bar

    def spy(total: int, desc: str, enabled: bool, threshold: int = 0) -> progress.Progress:
        seen.append((total, desc))
        return real_bar(total, desc, enabled, threshold=0)

    monkeypatch.setattr(progress, "bar", spy)
    rng = np.random.default_rng(0)
    f, r = [rng.standard_normal(1000)], [rng.standard_normal(1000)]
    with Client("http://x", transport=httpx.MockTransport(fake), progress=True) as c:
        c.combine(f, r, "simple")
    assert [d for _, d in seen] == ["upload", "download"]
    assert seen[0][0] > 16000
    assert "upload" in capsys.readouterr().err
    assert real_bar(10**9, "x", enabled=False) is progress.NULL
    assert real_bar(10, "x", enabled=True) is progress.NULL  # below the threshold
