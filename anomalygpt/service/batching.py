"""Micro-batching: requests for one profile that arrive within a short wait run through inference together.

All model work runs in one worker thread (torch on a 2-core CPU gains nothing from two concurrent forwards, and
one thread keeps the event loop free to accept and answer requests meanwhile). A gathered batch goes through
Inspector.inspect_many in that thread (core.InspectionService.run_batch), whatever request each image came with:
one backbone pass and one nearest-patch search per `--inference-batch` images (1 on a CPU, where batched passes
measured slower in this thread; the Inspector's batch on a GPU).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

MAX_GATHERED = 32  # requests per worker call: bounds one call's latency under a burst

RunBatch = Callable[[str, Sequence[Any]], list[Any]]  # (profile id, payloads) -> one result or exception each


@dataclass
class Pending:
    key: str
    payload: Any
    size: int  # images in the payload (queue depth counts images)
    future: asyncio.Future[Any]


class MicroBatcher:
    """An asyncio queue in front of the single worker thread; `submit` answers with the payload's result."""

    def __init__(self, run_batch: RunBatch, wait_s: float, executor: ThreadPoolExecutor) -> None:
        self.run_batch = run_batch
        self.wait_s = wait_s
        self.executor = executor
        self.depth = 0  # images submitted and not yet answered
        self.queue: asyncio.Queue[Pending] | None = None
        self.task: asyncio.Task[None] | None = None
        self.on_batch: Callable[[int], None] = lambda size: None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self.dispatch_forever())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def submit(self, key: str, payload: Any, size: int) -> Any:
        if self.queue is None:
            raise RuntimeError("the batcher is not started (the app's lifespan did not run)")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.depth += size
        try:
            await self.queue.put(Pending(key, payload, size, future))
            # A disconnected client cancels only its wait: work already queued still runs and is audited.
            return await future
        finally:
            self.depth -= size

    async def dispatch_forever(self) -> None:
        assert self.queue is not None
        while True:
            gathered = [await self.queue.get()]
            await asyncio.sleep(self.wait_s)  # let concurrent requests join this batch
            while len(gathered) < MAX_GATHERED and not self.queue.empty():
                gathered.append(self.queue.get_nowait())
            for key in dict.fromkeys(item.key for item in gathered):
                await self.run_group([item for item in gathered if item.key == key])

    async def run_group(self, items: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        self.on_batch(sum(item.size for item in items))
        try:
            results = await loop.run_in_executor(
                self.executor, self.run_batch, items[0].key, [i.payload for i in items]
            )
        except Exception as error:  # the batch function failed as a whole: every request in it gets the error
            results = [error] * len(items)
        for item, result in zip(items, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
