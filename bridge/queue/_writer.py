"""Group commit for SQLite, on the event loop, with the fsync off it.

Callers submit small functions of the connection. A committer task runs every
function waiting at that moment in one transaction on the event loop's thread
(SQLite statements on a page-cached file take microseconds), commits, and then
makes the transaction durable with one ``fdatasync`` of the write-ahead log in a
worker thread before it resolves the callers' futures. Concurrent deliveries share
one commit and one sync, and none is acknowledged before the sync that covers it
(interface.md: a 2xx survives a power cut). New deliveries, the bulk of the
traffic, are not functions but items for one *bulk* call per batch, which stores
them all with a statement per table (``executemany``) instead of seven each.

The commit is pipelined: while one batch's sync runs, the next batch's statements
and commit already run (at most ``_SYNC_DEPTH`` batches wait for their sync). The
syncs run in order on one thread, and a batch is answered only after the batch
before it, so an answer never overtakes the sync it depends on. A failed sync is
fail-stop: that batch, every batch behind it and every later call fail until a
restart, when SQLite's recovery reads back what the log really holds.

Why not ``synchronous=FULL`` on a writer thread: that syncs inside COMMIT, so the
statements had to run on a thread of their own, and handing every delivery to it
and back, with two busy threads trading the GIL, cost as much as the SQL itself
(bench/). Handing over whole batches instead (statements, commit and sync on the
thread) was measured too: fewer deliveries per second, not more, as the thread's
Python half still waits for the loop's GIL. Here the connection runs
``synchronous=NORMAL`` (SQLite writes the WAL at each commit and syncs it only at
checkpoints) and the bridge adds the sync per batch. Checkpoints run on their own
connection in another thread, so the loop never waits for the database file's sync;
one starts every ``_CHECKPOINT_ROWS`` changed rows (a few MB of log) rather than after
every commit: a checkpoint copies a page once however often it changed and pays for
one sync of the database file, and this cut the intake's CPU per delivery by about a
tenth (bench/). Should the log outgrow ``_WAL_LIMIT``, commits wait for a checkpoint to
copy the rest of it (see ``_catch_up``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bridge.errors import QueueUnavailable

log = logging.getLogger("bridge.queue")

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
# Stores many items with one statement per table; returns one result per item, in order.
Bulk = Callable[[sqlite3.Connection, list[Any]], list[Any]]
Result = tuple["asyncio.Future[Any]", Any, BaseException | None]
Call = tuple[Any, "asyncio.Future[Any]"]  # an Op, or an item for the bulk call, and its future

_MAX_BATCH = 512
# Batches committed whose sync has not finished: the next batch's statements and commit
# run while the previous batch's fdatasync does (pipelined group commit).
_SYNC_DEPTH = 2
# Checkpoint after this many rows were written since the last one began: about 4 KB of
# log each (a row change dirties about one page), so a checkpoint copies a few MB.
_CHECKPOINT_ROWS = 1024
# The log restarts from its beginning once a checkpoint has caught up with it, which a
# checkpoint running beside the commits may never do while writes keep coming. Past
# this size, as soon as no checkpoint is running, commits wait for one to copy the rest
# (so the log may pass the limit by what is written during one checkpoint), and SQLite
# cuts the file back to this size when the log restarts.
_WAL_LIMIT = 64 * 1024 * 1024


class Writer:
    def __init__(self, connect: Callable[[], sqlite3.Connection], file: Path, bulk: Bulk) -> None:
        self._connect = connect
        self._file = file
        self._bulk = bulk
        self._conn: sqlite3.Connection | None = None
        self._wal = -1
        self._pending: list[Call] = []  # functions of the connection
        self._items: list[Call] = []  # items for the bulk call
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._sync = ThreadPoolExecutor(1, thread_name_prefix="sqlite-sync")
        self._checkpoints = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpointing: asyncio.Future[None] | None = None
        self._checkpointed_at = 0  # total_changes when the last checkpoint began
        self._broken: QueueUnavailable | None = None  # set for good by a failed sync
        self.commits = 0  # transactions committed: fewer than calls when batching works

    def start(self) -> None:
        """Open the connection and the WAL, and start committing (inside the running loop)."""
        self._conn = self._connect()
        self._conn.execute("PRAGMA synchronous = NORMAL")  # the sync is ours: see above
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run off the loop
        self._conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
        wal = self._file.with_name(self._file.name + "-wal")
        self._wal = os.open(wal, os.O_RDWR | os.O_CREAT, 0o600)
        self._task = asyncio.get_running_loop().create_task(self._commit_forever())
        self._task.add_done_callback(self._committer_ended)

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``op`` for the next batch; its future gets what it returns."""
        return self._enqueue(self._pending, op)

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(op)

    def add(self, item: Any) -> asyncio.Future[Any]:
        """Queue ``item`` for the bulk call of the next batch; its future gets its result."""
        return self._enqueue(self._items, item)

    def _enqueue(self, waiting: list[Call], entry: Any) -> asyncio.Future[Any]:
        if self._broken is not None:
            raise QueueUnavailable(str(self._broken))
        if self._conn is None or self._stopping:
            raise QueueUnavailable("the SQLite queue is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting.append((entry, future))
        self._wake.set()
        return future

    async def stop(self) -> None:
        """Commit what is pending, checkpoint, close; the files and threads are let go
        of even when closing the connection fails."""
        self._stopping = True
        self._wake.set()
        try:
            if self._task is not None:
                await asyncio.wait([self._task])  # a committer that died has failed its calls
            if self._checkpointing is not None:
                await self._checkpointing
            if self._conn is not None:
                conn, self._conn = self._conn, None
                if self._broken is None:  # after a failed sync the log is left to recovery
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.close()
        finally:
            if self._wal >= 0:
                os.close(self._wal)
                self._wal = -1
            self._sync.shutdown()
            self._checkpoints.shutdown()

    async def _commit_forever(self) -> None:
        loop = asyncio.get_running_loop()
        syncing: collections.deque[asyncio.Task[None]] = collections.deque()
        while True:
            while syncing and syncing[0].done():
                syncing.popleft()
            if self._broken is not None:
                self._fail_waiting()
            if not self._pending and not self._items:
                if self._stopping:
                    await asyncio.gather(*syncing)
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            if len(syncing) >= _SYNC_DEPTH:
                await asyncio.wait([syncing[0]])
                continue
            if os.fstat(self._wal).st_size > _WAL_LIMIT and not self._checkpoint_running():
                await self._catch_up(loop)
            batch = self._pending[:_MAX_BATCH]
            del self._pending[:_MAX_BATCH]
            items = self._items[:_MAX_BATCH]
            del self._items[:_MAX_BATCH]
            assert self._conn is not None
            changes = self._conn.total_changes
            try:
                results = _commit(self._conn, batch, items, self._bulk)
            except BaseException as exc:  # a bug: fail this batch, and the writer (below)
                for _, future in batch + items:
                    if not future.done():
                        future.set_exception(QueueUnavailable(f"the queue failed: {exc!r}"))
                raise
            sync = None
            if self._conn.total_changes != changes:
                self.commits += 1
                sync = loop.run_in_executor(self._sync, os.fdatasync, self._wal)
                self._maybe_checkpoint(loop)
            behind = syncing[-1] if syncing else None
            syncing.append(loop.create_task(self._answer(results, behind, sync)))

    async def _answer(
        self,
        results: list[Result],
        behind: asyncio.Task[None] | None,
        sync: asyncio.Future[None] | None,
    ) -> None:
        """Resolve a batch's futures once it is durable: its own sync done, and the batch
        before it answered (so answers never overtake the syncs they depend on)."""
        try:
            if behind is not None:
                await asyncio.wait([behind])
            if sync is not None:
                try:
                    await sync
                except OSError as exc:
                    self._break(f"the queue could not sync its log: {exc}")
        finally:
            for future, value, failure in results:
                problem = self._broken or failure
                if future.done():
                    continue
                if problem is not None:
                    future.set_exception(problem)
                else:
                    future.set_result(value)

    def _break(self, why: str) -> None:
        """Fail-stop: after a failed sync nothing in the log is known to be durable, and a
        later sync succeeding proves nothing (Linux may have dropped the dirty pages), so
        every call from now on fails, the health check with it, until a restart recovers
        the log."""
        if self._broken is None:
            self._broken = QueueUnavailable(f"{why}; restart the bridge to recover the queue")
            log.error("%s; the queue refuses all writes until the bridge restarts", why)

    def _fail_waiting(self) -> None:
        assert self._broken is not None
        waiting = self._pending + self._items
        self._pending.clear()
        self._items.clear()
        for _, future in waiting:
            if not future.done():
                future.set_exception(QueueUnavailable(str(self._broken)))

    def _committer_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._break(f"the queue's committer stopped: {task.exception()!r}")
        self._fail_waiting()

    async def _catch_up(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hold commits while a checkpoint copies the rest of the log, so that it restarts.

        Called only when no checkpoint runs: one that was running went on to its end
        with commits still flowing, so what is left to copy now, during the pause, is
        just what was written meanwhile. (Waiting for that running checkpoint as well
        held commits for 40-60 ms under load, enough to set the p99; bench/.)"""
        # Routine under sustained load (at 1,300 deliveries/s, every two seconds or so):
        # checkpoints running beside the commits never catch up with them on their own.
        log.info(
            "the SQLite write-ahead log passed %d MB: commits wait for a checkpoint",
            _WAL_LIMIT // (1024 * 1024),
        )
        await self._start_checkpoint(loop)

    def _checkpoint_running(self) -> bool:
        return self._checkpointing is not None and not self._checkpointing.done()

    def _maybe_checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._checkpoint_running():
            return
        assert self._conn is not None
        behind = (self._conn.total_changes - self._checkpointed_at) % (1 << 32)  # it wraps
        if behind >= _CHECKPOINT_ROWS:
            self._start_checkpoint(loop)

    def _start_checkpoint(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        assert self._conn is not None
        self._checkpointed_at = self._conn.total_changes
        self._checkpointing = loop.run_in_executor(self._checkpoints, _checkpoint, self._file)
        return self._checkpointing


def _checkpoint(file: Path) -> None:
    """Copy the WAL back into the database (its own connection: it syncs the file)."""
    # Never raises: the next one tries again, and a growing WAL costs disk, not
    # correctness (the committer awaits this, so an exception would stop commits).
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(file, isolation_level=None)) as conn,
    ):
        conn.execute("PRAGMA busy_timeout = 1000")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _commit(
    conn: sqlite3.Connection, batch: list[Call], items: list[Call], bulk: Bulk
) -> list[Result]:
    """Run the batch in one transaction; a failing call does not undo the others."""
    try:
        return _run_batch(conn, batch, items, bulk)
    except _OpFailed:
        # One call failed: run the batch again, each call (each bulk item too) under its
        # own SAVEPOINT, so that the others still commit and the failing one gets its error.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        alone = [(_alone(bulk, item), future) for item, future in items]
        try:
            return _run_batch(conn, batch + alone, [], bulk, isolated=True)
        except sqlite3.Error as exc:
            return _failed(conn, batch + items, exc)
    except sqlite3.Error as exc:
        return _failed(conn, batch + items, exc)


def _run_batch(
    conn: sqlite3.Connection,
    batch: list[Call],
    items: list[Call],
    bulk: Bulk,
    isolated: bool = False,
) -> list[Result]:
    """One transaction for the batch and one bulk call for the items. Without
    ``isolated``, any call failing raises _OpFailed (nothing committed); with it,
    failures are caught per call."""
    results: list[Result] = []
    conn.execute("BEGIN IMMEDIATE")
    for op, future in batch:
        if not isolated:
            changes = conn.total_changes
            try:
                results.append((future, op(conn), None))
            except Exception as exc:
                if isinstance(exc, sqlite3.Error) or conn.total_changes != changes:
                    raise _OpFailed from exc  # it may have written: undo, run again isolated
                # A refusal before any write (NotFound, Conflict, IllegalTransition):
                # nothing to undo, so the batch goes on without a second run.
                results.append((future, None, exc))
            continue
        conn.execute("SAVEPOINT op")
        try:
            value = op(conn)
        except Exception as exc:  # the caller gets it, the batch goes on
            conn.execute("ROLLBACK TO op")
            results.append((future, None, _as_queue_error(exc)))
        else:
            results.append((future, value, None))
        conn.execute("RELEASE op")
    if items:
        try:
            values = bulk(conn, [item for item, _ in items])
        except Exception as exc:
            raise _OpFailed from exc
        results += [(future, value, None) for (_, future), value in zip(items, values, strict=True)]
    conn.execute("COMMIT")
    return results


def _alone(bulk: Bulk, item: Any) -> Op:
    return lambda conn: bulk(conn, [item])[0]


def _failed(conn: sqlite3.Connection, batch: list[Call], exc: sqlite3.Error) -> list[Result]:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
    error = QueueUnavailable(f"the queue could not commit: {exc}")
    return [(future, None, error) for _, future in batch]


class _OpFailed(Exception):
    """A call of the batch raised: the batch is run again with one SAVEPOINT per call."""


def _as_queue_error(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        return QueueUnavailable(f"the queue could not store: {exc}")
    return exc
