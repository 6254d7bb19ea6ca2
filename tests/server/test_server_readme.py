"""README.md stays true: its settings table lists every setting and its curl examples run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as st
from gradweight_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data"


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


def test_example_files_are_what_the_script_writes(tmp_path):
    """examples/data/ holds the bytes examples/curl_files.py writes (values exact in float32)."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "curl_files.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    for name in ("forget", "retain", "grads"):
        assert (tmp_path / f"{name}.safetensors").read_bytes() == (DATA / f"{name}.safetensors").read_bytes()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_run(live_server, tmp_path):
    """Run from a copy of the repository root's examples/data/, as the README says, URL aside."""
    shutil.copytree(DATA, tmp_path / "examples" / "data")
    commands = _curl_commands()
    assert len(commands) >= 5
    for cmd in commands:
        assert "--fail-with-body" in cmd, cmd  # -f alone hides the server's 4xx problem body
        cmd = cmd.replace("http://127.0.0.1:8000", live_server.url)
        out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    forget = st.load_file(str(DATA / "forget.safetensors"))
    combined = st.load_file(str(tmp_path / "combined.safetensors"))
    assert {k: v.shape for k, v in combined.items()} == {k: v.shape for k, v in forget.items()}
    flat = st.load_file(str(tmp_path / "scaled_grad.safetensors"))["scaled_grad"]
    assert flat.numel() == sum(v.numel() for v in forget.values()) == 12 + 5 + 8
    assert bool(flat.isfinite().all())
