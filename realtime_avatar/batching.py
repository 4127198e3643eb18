"""TickBatcher: requests of many sessions gathered per tick and processed in one worker call.

    batcher = TickBatcher(process, tick_s=0.04, max_pending=64, name="frames")
    await batcher.start()
    result = await batcher.submit(request)     # from any session's task
    await batcher.close()

The owner task wakes on the first pending request, waits for the next tick boundary (so that
everything due in the same tick lands in one batch) or until every submitter active in the last
`active_s` has a request pending, whichever comes first, takes every pending request (up to
`max_batch`) and runs `process(requests) -> results` in a worker thread: one call, one batch,
the event loop stays free. While a batch runs, new requests queue for the next one. So a lone
session never waits for a tick boundary (up to 40 ms of latency for nothing: nobody else's
frames could join its batch), and sessions that submit together go at once.

Bounds and faults: at most `max_pending` requests wait (submit() waits for room: the
back-pressure lands on the session that submits, not on the others); a submitter that goes
away (its task cancelled: a session closing) cancels its future, and a cancelled request is
skipped before the batch or its result dropped after it, so nobody else loses anything. An
exception in `process` fails that batch's requests only; the loop goes on. close() cancels
what still waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")


class BatcherClosed(RuntimeError):
    """submit() on a batcher that is closed (the process shuts down)."""


@dataclass
class _Pending(Generic[Req, Res]):
    request: Req
    future: asyncio.Future
    size: int
    submitter: object = None  # the submitting task (a session's render loop)


ACTIVE_S = 1.0  # a submitter counts as active for this long after its last request


def everyone_is_in(pending: set, active: set) -> bool:
    """Whether a batch can start before its tick: every active submitter has a request
    pending (then nobody else's request could still join it). Empty `active`: True."""
    return active <= pending


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    items: int = 0  # what `size` counts (frames, windows)
    cancelled: int = 0  # requests whose submitter left before the result
    failed_batches: int = 0
    busy_seconds: float = 0.0
    largest_batch: int = 0
    sizes: list[int] = field(default_factory=list)  # items per batch, the last 1000

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "sizes"}
        d["busy_seconds"] = round(self.busy_seconds, 3)
        d["mean_batch"] = round(self.items / self.batches, 2) if self.batches else 0.0
        return d


class TickBatcher(Generic[Req, Res]):
    def __init__(
        self,
        process: Callable[[Sequence[Req]], Sequence[Res]],
        *,
        tick_s: float = 0.04,
        max_pending: int = 256,
        max_batch: int | None = None,
        size: Callable[[Req], int] = lambda _: 1,
        name: str = "batcher",
        executor: concurrent.futures.Executor | None = None,
    ):
        """process: the batch function (runs in a worker thread, one call at a time);
        tick_s: batches start on multiples of this after start() (0: as soon as one waits);
        max_pending: requests that may wait; max_batch: items per process() call (a request
        is never split; None: no limit); size: items in a request (frames, windows);
        executor: where process() runs (None: the loop's default thread pool)."""
        self.process = process
        self.executor = executor
        self.tick_s = tick_s
        self.max_batch = max_batch
        self.size = size
        self.name = name
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_pending)
        self._task: asyncio.Task | None = None
        self._carry: _Pending | None = None  # a request that did not fit the last batch
        self._t0 = 0.0
        self._closed = False
        self.active_s = ACTIVE_S
        self._last_seen: dict[object, float] = {}  # submitter -> loop time of its last request
        self._pending_from: dict[object, int] = {}  # submitter -> requests waiting
        self._arrived = asyncio.Event()

    @property
    def pending(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    async def start(self) -> None:
        if self._task is None:
            self._t0 = asyncio.get_running_loop().time()
            self._task = asyncio.create_task(self._loop(), name=f"{self.name}-batcher")

    async def submit(self, request: Req, *, regular: bool = True) -> Res:
        """The result of `request` once its batch has run. Raises BatcherClosed after close(),
        the batch's exception if process() failed, CancelledError when the caller is.
        regular=False: a one-off request (a timing probe); its task does not become a submitter
        that later batches wait for."""
        if self._closed:
            raise BatcherClosed(f"{self.name}: closed")
        if self._task is None:
            await self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        submitter = asyncio.current_task() if regular else None
        await self._queue.put(_Pending(request, future, self.size(request), submitter))
        if submitter is not None:
            self._last_seen[submitter] = loop.time()
            self._pending_from[submitter] = self._pending_from.get(submitter, 0) + 1
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # the loop skips it, or drops its result
            raise

    def _everyone_in(self) -> bool:
        now = asyncio.get_running_loop().time()
        for submitter, seen in list(self._last_seen.items()):
            if now - seen > self.active_s:
                del self._last_seen[submitter]  # gone quiet (listening, or closed)
        pending = {s for s, n in self._pending_from.items() if n > 0}
        return everyone_is_in(pending, set(self._last_seen))

    async def _next_tick(self) -> None:
        """Until the next tick boundary, or until every active submitter has a request in."""
        if self.tick_s <= 0:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        ticks = int((now - self._t0) / self.tick_s) + 1
        deadline = self._t0 + ticks * self.tick_s
        while not self._everyone_in() and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break

    def _take_batch(self, first: _Pending) -> list[_Pending]:
        batch, items = [first], first.size
        while self._queue.qsize():
            item = self._queue.get_nowait()
            if self.max_batch is not None and items + item.size > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            items += item.size
        for p in batch:
            if p.submitter is None:
                continue
            left = self._pending_from.get(p.submitter, 0) - 1
            if left > 0:
                self._pending_from[p.submitter] = left
            else:
                self._pending_from.pop(p.submitter, None)
        return batch

    async def _loop(self) -> None:
        while True:
            if self._carry is not None:
                first, self._carry = self._carry, None
            else:
                first = await self._queue.get()
                await self._next_tick()
            taken = self._take_batch(first)
            batch = [p for p in taken if not p.future.cancelled()]
            self.stats.cancelled += len(taken) - len(batch)
            if not batch:
                continue
            requests = [p.request for p in batch]
            start = time.perf_counter()
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, self.process, requests)
            except asyncio.CancelledError:
                for p in batch:
                    p.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                log.error("%s: a batch of %d requests failed", self.name, len(batch), exc_info=exc)
                self.stats.failed_batches += 1
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self.stats.busy_seconds += time.perf_counter() - start
            items = sum(p.size for p in batch)
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.items += items
            self.stats.largest_batch = max(self.stats.largest_batch, items)
            self.stats.sizes = (self.stats.sizes + [items])[-1000:]
            for p, result in zip(batch, results):
                if p.future.done():  # cancelled while the batch ran: its result goes nowhere
                    self.stats.cancelled += 1
                else:
                    p.future.set_result(result)

    async def close(self) -> None:
        """Stop the owner task and cancel every waiting request. Safe to call twice."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        leftovers = [self._carry] if self._carry is not None else []
        self._carry = None
        while self._queue.qsize():
            leftovers.append(self._queue.get_nowait())
        for p in leftovers:
            p.future.cancel()
