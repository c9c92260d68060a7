"""Dynamic batching of concurrent requests, as Triton's dynamic batcher does it.

Requests wait in one queue per :class:`~gradmap.serve._settings.BatchKey` (model, method and its
settings, target...). A dispatcher per model takes the key whose oldest request waited longest and
runs up to ``max_batch`` of its requests as one batch, after waiting at most ``max_wait`` seconds
for the batch to fill. The batch runs on the model's own thread, never on the event loop; requests
arriving meanwhile wait for the next batch, so a busy model batches by itself even with
``max_wait=0``. ``max_batch=1`` turns batching off.

A request whose caller gave up (timeout, client gone) while it waited is dropped before its batch
runs. Once every request of a running batch has been given up, :data:`batch_abandoned` (the event
``run`` sees in its thread) is set: a ``run`` that checks it between its steps stops early by raising
:class:`BatchAbandoned`, and the model's thread is free for the next batch.

Failures travel as values, never raised through the futures: an exception set on a future and
raised by the waiting coroutine makes a reference cycle (future, exception, traceback, the frame
holding the future) that keeps the request's bytes alive until the cyclic garbage collector runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

__all__ = ["DynamicBatcher", "QueueFull", "BatchAbandoned", "batch_abandoned"]

logger = logging.getLogger(__name__)

#: In the thread running a batch: an event set once every request of the batch has been given up.
batch_abandoned: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("gradmap_batch_abandoned",
                                                                                         default=None)


class BatchAbandoned(Exception):
    """Raised by a batch's ``run`` that stopped early: every request in the batch had been given up."""


class QueueFull(Exception):
    """No room for more requests: the server answers 503 with Retry-After."""


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    since: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Batches the requests of one model and runs ``run(key, items) -> results`` on its own thread.

    Args:
        run: called with a key and up to ``max_batch`` items; returns one result per item, or an
            exception instance for an item that failed alone. An exception it raises fails the
            batch: every item's result is that exception (without its traceback).
        name: the model's name (thread name, logs).
        max_batch: most items in one call of ``run``.
        max_wait: seconds the first item of a batch waits for others to join.
        on_batch: called with (key, batch size, seconds) after each batch, for metrics.
    """

    def __init__(self, run: Callable[[Hashable, Sequence[Any]], Sequence[Any]], name: str, *, max_batch: int,
                 max_wait: float, on_batch: Callable[[Hashable, int, float], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.name, self.max_batch, self.max_wait = run, name, max_batch, max(0.0, max_wait)
        self.on_batch = on_batch
        self._queues: "OrderedDict[Hashable, deque[_Waiting]]" = OrderedDict()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gradmap-model-{name}")
        self.waiting = 0  # items queued, not yet in a running batch
        self.running = 0  # items in the running batch

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name=f"gradmap-batcher-{self.name}")

    async def stop(self) -> None:
        """Stop dispatching; requests still queued fail. The running batch finishes first."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for queue in self._queues.values():
            for waiting in queue:
                if not waiting.future.done():
                    waiting.future.set_result(RuntimeError("the server is shutting down"))
        self._queues.clear()
        self._executor.shutdown(wait=True)

    async def submit(self, key: Hashable, item: Any) -> Any:
        """Queue ``item`` under ``key`` and wait for its result: a value, or an exception instance
        (returned, not raised) when the item or its batch failed."""
        if self._task is None or self._task.done():
            raise RuntimeError(f"model {self.name} is not running")
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Waiting(item, future))
        self.waiting += 1
        self._arrived.set()
        return await future

    def _oldest(self) -> Hashable | None:
        """The key whose first live request waited longest (dropping requests whose caller left)."""
        best, since = None, None
        for key in list(self._queues):
            queue = self._queues[key]
            while queue and queue[0].future.done():  # cancelled: timed out or disconnected
                queue.popleft()
                self.waiting -= 1
            if not queue:
                del self._queues[key]
            elif since is None or queue[0].since < since:
                best, since = key, queue[0].since
        return best

    def _take(self, key: Hashable) -> list[_Waiting]:
        queue = self._queues.get(key, deque())
        batch = []
        while queue and len(batch) < self.max_batch:
            waiting = queue.popleft()
            self.waiting -= 1
            if not waiting.future.done():
                batch.append(waiting)
        if not queue:
            self._queues.pop(key, None)
        return batch

    def _live(self, key: Hashable) -> int:
        return sum(not w.future.done() for w in self._queues.get(key, ()))

    @staticmethod
    def _watch(batch: list[_Waiting]) -> threading.Event:
        """An event set (from the event loop) once every request of ``batch`` has been given up."""
        abandoned = threading.Event()
        left = [len(batch)]

        def given_up(future: asyncio.Future) -> None:
            if future.cancelled():
                left[0] -= 1
                if left[0] == 0:
                    abandoned.set()

        for waiting in batch:
            waiting.future.add_done_callback(given_up)
        return abandoned

    def _run(self, key: Hashable, items: list[Any], abandoned: threading.Event) -> Sequence[Any]:
        """``run`` in the model's thread, with :data:`batch_abandoned` set to the batch's event."""
        token = batch_abandoned.set(abandoned)
        try:
            return self.run(key, items)
        finally:
            batch_abandoned.reset(token)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = self._oldest()
            if key is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = self._queues[key][0].since + self.max_wait
            while self._live(key) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take(key)
            if not batch:
                continue
            self.running = len(batch)
            started = time.monotonic()
            abandoned = self._watch(batch)
            try:
                results = await loop.run_in_executor(self._executor, self._run, key, [w.item for w in batch],
                                                     abandoned)
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
            except BatchAbandoned as e:  # nobody waits for these results
                logger.info("model %s: a batch of %d stopped after %.1f s: %s", self.name, len(batch),
                            time.monotonic() - started, e)
                e.__traceback__ = None
                results = [e] * len(batch)
            except asyncio.CancelledError:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_result(RuntimeError("the server is shutting down"))
                raise
            except Exception as e:  # the whole batch failed: every request in it gets the error
                logger.exception("model %s: a batch of %d failed", self.name, len(batch))
                e.__traceback__ = None
                results = [e] * len(batch)
            finally:
                self.running = 0
            if self.on_batch is not None:
                self.on_batch(key, len(batch), time.monotonic() - started)
            for waiting, result in zip(batch, results):
                if not waiting.future.done():
                    waiting.future.set_result(result)
            del batch, results, waiting, result  # held until the next batch otherwise
