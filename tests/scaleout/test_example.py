"""examples/distributed.py under torchrun (2 CPU ranks, gloo): DDP and FSDP2 give the same steps."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distributed.py"
LINE = re.compile(r"^(ddp|fsdp) step +(\d+)  forget loss (\S+)  retain loss (\S+)  weights (.*)$", re.M)


@pytest.mark.timeout(200)
def test_ddp_and_fsdp_unlearn_alike_under_torchrun(live_server):
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen(
        [
            str(torchrun),
            "--standalone",  # a free rendezvous port on 127.0.0.1
            "--nproc-per-node",
            "2",
            str(EXAMPLE),
            "--url",
            live_server.url,
            "--strategy",
            "ddp",
            "fsdp",
            "--steps",
            "4",
            "--method",
            "nash",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # torchrun and its workers in a group of their own, stopped together
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    rows = LINE.findall(stdout)
    ddp = [r[1:] for r in rows if r[0] == "ddp"]
    fsdp = [r[1:] for r in rows if r[0] == "fsdp"]
    assert len(ddp) == 4, stdout
    # the same model, data and method: the replicated and the sharded path print the same numbers
    assert fsdp == ddp
    forget = [float(r[1]) for r in ddp]
    assert forget[-1] > forget[0]  # unlearning: the forget loss rises
