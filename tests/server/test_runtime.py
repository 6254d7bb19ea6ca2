"""The compute thread: a small request's passes run on one torch thread, a large one's on the default."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import torch
from gradweight_server.runtime import PARALLEL_FROM, Runtime
from gradweight_server.settings import Settings


def test_small_requests_compute_on_one_thread_and_large_ones_on_the_default() -> None:
    default = torch.get_num_threads()

    async def main() -> tuple[int, int, int]:
        runtime = Runtime(Settings(warmup=False))
        await runtime.start()
        try:
            small = await runtime.compute(torch.get_num_threads, nbytes=PARALLEL_FROM - 1)
            large = await runtime.compute(torch.get_num_threads, nbytes=PARALLEL_FROM)
            again = await runtime.compute(torch.get_num_threads, nbytes=10)
            return small, large, again
        finally:
            await runtime.stop()

    assert asyncio.run(main()) == (1, default, 1)
    assert torch.get_num_threads() == default  # the caller's thread keeps its count


def test_the_openmp_wait_policy_is_set_before_torch_unless_the_operator_chose() -> None:
    code = (
        "import os, sys; import gradweight_server; "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["PASSIVE", "False"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["ACTIVE", "False"]
