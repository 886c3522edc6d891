"""Group commit for PostgreSQL: concurrent calls share one transaction and one commit.

A :class:`Batcher` collects the items submitted while its previous transaction is
in flight, then runs them all in the next one, like :mod:`bridge.queue._writer`
does for SQLite. A caller's future resolves only after the commit (with
``synchronous_commit = on``, after the WAL is flushed), so nothing is acknowledged
before it is durable. One transaction at a time per batcher also keeps a replica's
deliveries in the order they were received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from bridge.errors import QueueUnavailable

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")

# What a batch run returns for each item: its result, or the exception its caller gets.
RunBatch = Callable[[Sequence[I]], Awaitable[Sequence[R | Exception]]]


class Batcher(Generic[I, R]):
    def __init__(self, run: RunBatch[I, R], *, max_batch: int, name: str) -> None:
        self._run = run
        self._max = max_batch
        self._name = name
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.commits = 0  # batches committed: fewer than calls when batching works

    async def submit(self, item: I) -> R:
        if self._closed:
            raise QueueUnavailable("the PostgreSQL queue is closed")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # Retrieved here too, so that one nobody awaits any more is not reported as lost.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=self._name)
        self._wake.set()
        # A caller that gives up (a client went away) does not cancel the batch.
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Finish what was submitted, then stop."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[: self._max], self._pending[self._max :]
                await self._commit(batch)
            if self._closed:
                return

    async def _commit(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            results: Sequence[R | Exception] = await self._run([item for item, _ in batch])
        except Exception as exc:  # the transaction failed: every caller of the batch gets it
            error = exc if isinstance(exc, QueueUnavailable) else QueueUnavailable(str(exc))
            results = [error] * len(batch)
        else:
            self.commits += 1
        if len(results) != len(batch):  # a bug; never leave a caller waiting for ever
            results = [QueueUnavailable("the queue answered a batch wrongly")] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
