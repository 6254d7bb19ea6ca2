"""The app's shared state: settings, device, admission counters, buffer pool, metrics, the compute thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from gradweight.errors import DeviceOutOfMemory
from gradweight.methods import Munba

from .admission import Admission
from .engine import resolve_device, run
from .engine.methods import warm_up
from .metrics import Metrics
from .pool import BufferPool
from .settings import Settings

log = logging.getLogger("gradweight_server")
T = TypeVar("T")
PARALLEL_FROM = 16 << 20  # request bytes; a smaller request computes on one thread (`Runtime.compute`)


class Runtime:
    """Created by the app factory; `start` runs in the lifespan, on the event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.admission = Admission(
            settings.max_concurrency, settings.max_inflight_bytes, settings.retry_after_s
        )
        self.pool = BufferPool(settings.buffer_pool_bytes)
        self.device: torch.device | None = None
        self.ready = False
        self._executor: ThreadPoolExecutor | None = None
        self._threads = torch.get_num_threads()
        self._warmup: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Resolve the device now (a wrong --device fails start-up) and warm up in the background."""
        self.device = resolve_device(self.settings.device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradweight-compute")
        if self.settings.warmup:
            self._warmup = asyncio.create_task(self._warm())
        else:
            self.ready = True

    async def stop(self) -> None:
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _warm(self) -> None:
        try:
            await self.in_worker(self._warm_sync)
        except Exception:
            log.exception("warm-up combine failed; /readyz stays 503")
            return
        self.ready = True
        log.info("ready on %s", self.device)

    def _warm_sync(self) -> None:
        assert self.device is not None
        gen = torch.Generator().manual_seed(0)
        groups = {g: [torch.randn(256, generator=gen).to(self.device)] for g in ("retain", "forget")}
        run(Munba(), groups, keys=["0"])
        warm_up()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    async def compute(self, job: Callable[[], T], *, nbytes: int, inline: bool = False) -> T:
        """Run `job` on the compute thread while holding a compute slot; running out of memory there
        answers 503 device-out-of-memory and leaves the server up. An `inline` job (microseconds of work
        on a few numbers) runs on the event loop: the hop to the thread and back would cost more.

        A request of under PARALLEL_FROM bytes (`nbytes`) computes on one torch thread (`threads_for`).
        The bytes do not depend on the thread count."""
        if inline:
            return self._out_of_memory_mapped(job)
        threads = self.threads_for(nbytes)
        async with self.admission.compute_slot(self.settings.body_timeout_s):
            return await self.in_worker(lambda: self._out_of_memory_mapped(job, threads))

    def threads_for(self, nbytes: int) -> int:
        """The threads a request of `nbytes` computes on. A parallel operation waits for its slowest
        thread, and a descheduled one costs a time slice: on 2 cores, with two OpenMP threads and the
        other core busy, the munba step at 1M parameters took 8.8 ms against 3.1 on one thread. A small
        request gains little and risks much; a large one's gram and combine share their stretches between
        threads (`gradweight.blocks.share`), which gains most and degrades to one thread's time."""
        return 1 if nbytes < PARALLEL_FROM else self._threads

    def _out_of_memory_mapped(self, job: Callable[[], T], threads: int | None = None) -> T:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # this thread's OpenMP team only; the event loop runs no passes
        try:
            return job()
        except torch.OutOfMemoryError:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory("the device ran out of memory for this request") from None
        except MemoryError:
            raise DeviceOutOfMemory("the server ran out of memory for this request") from None

    async def in_worker(self, fn: Callable[[], T]) -> T:
        """Run blocking work off the event loop on the one compute thread.

        One long-lived thread, not a pool: torch gives every calling thread its own OpenMP team, and
        idle teams spin-wait, so alternating threads starved each other (a 5 ms combine took over 1 s).
        Admitted requests still overlap their uploads with the compute of others.
        """
        assert self._executor is not None, "runtime not started"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
