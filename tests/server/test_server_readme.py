"""README.md stays true: its settings table lists every setting and its curl examples run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch as st
from gradweight_server.settings import Settings
from srv_util import random_groups, safetensors_body

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_table_lists_every_setting():
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"`GRADWEIGHT_{name.upper()}`" in text, name


def _curl_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands, current = [], ""
    for line in "\n".join(blocks).splitlines():
        if line.startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").rstrip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_run(live_server, tmp_path):
    groups = random_groups(5)
    for g in ("forget", "retain"):
        st.save_file({str(i): t for i, t in enumerate(groups[g])}, str(tmp_path / f"{g}.safetensors"))
    (tmp_path / "grads.safetensors").write_bytes(safetensors_body(groups))
    commands = _curl_commands()
    assert len(commands) >= 5
    for cmd in commands:
        cmd = cmd.replace("http://127.0.0.1:8000", live_server.url)
        out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    combined = st.load_file(str(tmp_path / "combined.safetensors"))
    assert [combined[str(i)].shape for i in range(3)] == [t.shape for t in groups["forget"]]
    assert st.load_file(str(tmp_path / "scaled_grad.safetensors"))["scaled_grad"].numel() == 12 + 5 + 8
