"""Group commit for SQLite: one thread owns the connection and commits batches.

Callers submit small functions of the connection; the thread runs every function
waiting at that moment inside one transaction, each under a SAVEPOINT so one
failing call does not undo the others, then commits once (one fsync with
``synchronous=FULL``) and only then resolves the callers' futures. Concurrent
deliveries therefore share a commit and a sync, and none is acknowledged before
it is durable (interface.md: a 2xx survives a power cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from bridge.errors import QueueUnavailable

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

_MAX_BATCH = 512


class Writer:
    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._ops: queue.SimpleQueue[tuple[Op, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self.commits = 0  # transactions committed: fewer than calls when batching works

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if not self._thread.is_alive():
            raise QueueUnavailable("the SQLite queue is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._ops.put((op, future))
        return future

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(op)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._ops.put(None)
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                first = self._ops.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(
        self, conn: sqlite3.Connection, batch: list[tuple[Op, asyncio.Future[Any]]]
    ) -> None:
        try:
            results = self._run_batch(conn, batch)
        except _OpFailed:
            # One call failed: run the batch again, each call under its own SAVEPOINT,
            # so that the others still commit and the failing one gets its error.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            try:
                results = self._run_batch(conn, batch, isolated=True)
            except sqlite3.Error as exc:
                results = self._failed(conn, batch, exc)
        except sqlite3.Error as exc:
            results = self._failed(conn, batch, exc)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for item in results:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            # RuntimeError: that loop is closed, so nobody waits for these any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, items)

    def _run_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[Op, asyncio.Future[Any]]],
        isolated: bool = False,
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """One transaction for the batch. Without ``isolated``, any call failing raises
        _OpFailed (nothing committed); with it, failures are caught per call."""
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        conn.execute("BEGIN IMMEDIATE")
        for op, future in batch:
            if not isolated:
                try:
                    results.append((future, op(conn), None))
                except Exception as exc:  # retried below, isolated
                    raise _OpFailed from exc
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
        conn.execute("COMMIT")
        self.commits += 1
        return results

    def _failed(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[Op, asyncio.Future[Any]]],
        exc: sqlite3.Error,
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
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


def _resolve(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in items:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
