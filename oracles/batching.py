"""A bounded FIFO queue in front of one model, merging concurrent requests into one model call.

Used by :mod:`oracles.http_service`; asyncio and numpy only (the server stack imports it).
Requests whose bodies are complete wait here in arrival order; one task takes the oldest,
waits up to ``max_delay`` seconds for company, merges up to ``max_batch`` images of the
waiting requests into one ``(m, C, H, W)`` array, runs the model once on a worker thread and
hands each request its own rows of the logits (Triton's dynamic batcher, without preferred
sizes). While the model runs, new requests queue up, so under load batches grow by
themselves; ``max_delay`` only matters when the model is idle.

Merging is exact only for a model that maps each image on its own, the same whatever else
shares its call; ``merge_allowed()`` is asked before every merge and a False answer (e.g. a
torch module with a submodule in training mode) makes each request its own model call.

Bounds: at most ``max_queue`` requests wait (beyond them :class:`QueueFull`), each at most
``queue_timeout`` seconds before its batch starts (then :class:`QueueTimeout`); a request in
a running batch is always answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue already holds ``max_queue`` waiting requests (or is closing)."""


class QueueTimeout(Exception):
    """The request waited ``queue_timeout`` seconds without its batch starting."""


@dataclass(frozen=True)
class BatchRecord:
    """What one model call did, handed to the ``on_batch`` observer.

    ``queue_seconds`` has one entry per merged request (from its arrival to the start of the
    call); ``compute_seconds`` is the model call's wall time (None when it raised).
    """

    images: int
    requests: int
    queue_seconds: tuple[float, ...]
    compute_seconds: float | None


@dataclass(eq=False)
class _Waiting:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]
    arrived: float = field(default_factory=time.perf_counter)
    taken: bool = False  # in a batch: it will be answered whatever happens
    abandoned: bool = False  # timed out or its client left: skip it


class DynamicBatcher:
    """FIFO queue + merging model calls; construct, then ``await submit(images)`` from the
    event loop. The worker task starts with the first request.

    Args:
        predict: ``(m, C, H, W) float32 -> (m, K) float32``, run on ``executor``.
        executor: where model calls run (one worker keeps them one at a time).
        max_batch: most images per model call (a larger request is run alone).
        max_queue: most requests waiting for a model call.
        queue_timeout: seconds a request may wait before its call starts.
        max_delay: seconds the oldest request waits for company when the model is idle.
        merge_allowed: asked before each merge; False -> one model call per request.
        on_batch: observer called on the event loop after each model call.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        executor: concurrent.futures.Executor,
        *,
        max_batch: int,
        max_queue: int,
        queue_timeout: float,
        max_delay: float,
        merge_allowed: Callable[[], bool],
        on_batch: Callable[[BatchRecord], None] | None = None,
    ):
        self._predict = predict
        self._executor = executor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.max_delay = max_delay
        self._merge_allowed = merge_allowed
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._carry: _Waiting | None = None  # taken from the queue, did not fit the last batch
        self._worker: asyncio.Task[None] | None = None
        self.waiting = 0  # requests queued and not abandoned
        self.closed = False

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """The logits for ``images``, computed in some batch.

        Raises:
            QueueFull: ``max_queue`` requests already wait, or the batcher is closed.
            QueueTimeout: the call did not start within ``queue_timeout`` seconds.
            Exception: whatever ``predict`` raised for the batch.
        """
        if self.closed or self.waiting >= self.max_queue:
            raise QueueFull
        self._start()
        assert self._queue is not None
        item = _Waiting(images, asyncio.get_running_loop().create_future())
        self.waiting += 1
        self._queue.put_nowait(item)
        try:
            done, _ = await asyncio.wait({item.future}, timeout=self.queue_timeout)
            if not done and not item.taken:
                self._abandon(item)
                raise QueueTimeout
            return await item.future
        except asyncio.CancelledError:  # the client went away (or shutdown ran out of time)
            self._abandon(item)
            raise

    def close(self) -> None:
        """Refuse new requests; the queued ones are still answered."""
        self.closed = True

    def _abandon(self, item: _Waiting) -> None:
        if not item.taken and not item.abandoned:
            item.abandoned = True
            self.waiting -= 1

    def _start(self) -> None:
        if self._worker is None or self._worker.done():
            if self._queue is None:
                self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name="zoopt-batcher"
            )

    async def _next(self, timeout: float | None) -> _Waiting | None:
        """The oldest live request, waiting at most ``timeout`` s (None: forever)."""
        assert self._queue is not None
        while True:
            if self._carry is not None:
                item, self._carry = self._carry, None
            elif timeout is None:
                item = await self._queue.get()
            else:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if timeout <= 0:
                        return None
                    try:
                        # Queue.get removes an item only after waking, so a timeout that
                        # cancels it never loses one.
                        async with asyncio.timeout(timeout):
                            item = await self._queue.get()
                    except TimeoutError:
                        return None
            if not item.abandoned:
                return item

    async def _work(self) -> None:
        while True:
            first = await self._next(None)
            assert first is not None
            batch, size = [first], first.images.shape[0]
            if self._merge_allowed():
                deadline = time.perf_counter() + self.max_delay
                while size < self.max_batch:
                    item = await self._next(deadline - time.perf_counter())
                    if item is None:
                        break
                    if size + item.images.shape[0] > self.max_batch:
                        self._carry = item  # first in the next batch: FIFO is kept
                        break
                    batch.append(item)
                    size += item.images.shape[0]
            await self._run(batch, size)

    async def _run(self, batch: list[_Waiting], size: int) -> None:
        start = time.perf_counter()
        for item in batch:
            item.taken = True
        self.waiting -= len(batch)
        images = batch[0].images if len(batch) == 1 else np.concatenate([b.images for b in batch])
        loop = asyncio.get_running_loop()
        compute: float | None = None
        try:
            logits = await loop.run_in_executor(self._executor, self._predict, images)
            compute = time.perf_counter() - start
        except Exception as exc:  # every request of the batch gets the model's error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            row = 0
            for item in batch:
                rows = item.images.shape[0]
                if not item.future.done():
                    item.future.set_result(logits[row : row + rows])
                row += rows
        if self._on_batch is not None:
            record = BatchRecord(
                images=size,
                requests=len(batch),
                queue_seconds=tuple(start - item.arrived for item in batch),
                compute_seconds=compute,
            )
            try:
                self._on_batch(record)
            except Exception:  # an observer's bug must not stop the queue
                log.exception("the batch observer failed")
