"""The PostgreSQL queue: one database shared by any number of bridge replicas.

Everything interface.md promises holds across replicas; the design, in short:

*Durability and group commit.* Every connection runs with ``synchronous_commit``
on (set when the server's default is off), so a commit returns only once the WAL
is flushed. ``add`` and ``settle`` go through a :class:`~._postgres_batch.Batcher`
each: the calls made while one transaction is in flight are done together in the
next, with multi-row statements sent in pipeline mode (a few round trips per batch,
whatever its size), and share its commit. A batch PostgreSQL refuses (a value it
cannot store) is retried one delivery at a time, so only the bad one gets a 503.

*Dedupe across replicas.* An add batch first takes an advisory lock per GUID (a
32-bit hash of it), then looks the GUIDs up: a replica inserting the same GUID
holds that lock until it commits, so the look-up sees its row, and a redelivery
to another replica is a duplicate, in the same transaction as the insert.
Per-repository numbers come from an upsert of the ``repos`` counter row in that
transaction (rows locked in key order), so they are gapless and the same
whichever replica answers.

*Lanes.* Like SQLite, the oldest active job of a lane is its *head* (``head``)
and only heads are claimed; the partial index ``jobs_ready`` holds just the
active heads. Every change to a lane's set of active jobs (insert, finish,
cancel, restart) and the promotion of the next head happen under
``pg_advisory_xact_lock(NS_LANE, hash(lane))``. That lock was chosen over row
locks because it also covers the lane's *future* rows (an insert deciding
whether it heads the lane has no row to lock yet), and over a lanes table
because it costs no extra rows, writes or vacuum. A hash collision only makes
two lanes wait for each other briefly.

*Leases.* A claim (``FOR NO KEY UPDATE SKIP LOCKED``, one statement for up to
``limit`` jobs) marks jobs running until ``lease_until`` and stamps a random
``claim_token``. Nothing is released at start-up (another replica may hold those
claims); instead a running job whose lease has passed is claimable again,
through the same index (``due_at`` is the lease's end for a running job), and is
handed out ``unclear`` so the worker looks in Vela before re-sending
(``next_due`` counts those lease ends too). A settlement whose token no longer
matches (its lease was retaken) changes nothing but the attempts log. Leases are
computed from the replicas' clocks, which must agree to well within
``queue.lease_seconds``.

*No deadlocks between replicas.* Each transaction takes its advisory locks
first, in ascending order in one statement, then job rows (ascending id), then
delivery rows (ascending id); see :mod:`._postgres_rows`. Deadlocks that remain
possible in rare interleavings with the retention purge are retried.

*Bounded waits.* GitHub marks a delivery failed after 10 s, so intake must answer
503 before that rather than hang on a stuck peer: every pooled session runs with
``lock_timeout`` 2 s and ``idle_in_transaction_session_timeout`` 10 s, and intake's
transactions with ``statement_timeout`` 5 s; a timeout is QueueUnavailable.
After an outage the pool reconnects within seconds of the server being back.

The driver is psycopg 3 (``pip install 'vela-bridge[postgres]'``), imported
only when a ``postgresql://`` URL is opened.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from bridge.errors import QueueUnavailable
from bridge.queue import (
    Added,
    Attempt,
    ClaimedJob,
    DeliveryRecord,
    JobRecord,
    NewDelivery,
    Page,
    Reconvert,
    Settlement,
)
from bridge.queue import _postgres_history as history
from bridge.queue import _postgres_work as work
from bridge.queue._postgres_batch import Batcher
from bridge.queue._postgres_history import clean
from bridge.queue._postgres_rows import Conn, refresh
from bridge.queue._postgres_schema import ACTIVE_SQL, migrate
from bridge.queue._postgres_url import masked, scrub

log = logging.getLogger("bridge.queue")

T = TypeVar("T")

# Active heads due now, or running past their lease, through the partial index jobs_ready.
CLAIM_SQL = (
    "WITH due AS (SELECT id FROM jobs"
    f" WHERE head AND state IN {ACTIVE_SQL} AND due_at <= %(now)s"
    " ORDER BY due_at LIMIT %(limit)s FOR NO KEY UPDATE SKIP LOCKED)"
    " UPDATE jobs j SET state = 'running', lease_until = %(lease)s, claim_token = %(token)s,"
    " unclear = j.unclear OR j.state = 'running', started_at = COALESCE(j.started_at, %(now)s)"
    " FROM due, deliveries d WHERE j.id = due.id AND d.id = j.delivery_id"
    " RETURNING j.id, d.guid, j.number, j.endpoint, j.org, j.repo, j.path, j.body, j.attempts,"
    " j.first_attempt_at, j.unclear, d.github_event, d.action, j.delivery_id, j.lane, j.fallback,"
    " j.started_at,"
    # When the job's latest attempt ended, through the index attempts_job.
    " (SELECT max(a.started_at + a.duration) FROM attempts a WHERE a.job_id = j.id),"
    " j.error"
)
_DEDUPE_SECONDS = 7 * 86_400  # interface.md: GUIDs are kept at least 7 days
_MAX_BATCH = 256
_POOL_SIZE = 10
_CONNECT_SECONDS = 5.0  # GitHub gives a delivery 10 s: answer 503 well before that
# Session settings of every pooled connection (set by _configure, not through the URL's
# options=, which the operator may need for search_path). The bridge holds its locks for
# milliseconds, so a wait of 2 s means a stuck session elsewhere: the statement fails
# (lock_not_available) and intake answers 503 well within GitHub's 10 s, rather than
# waiting for ever and being marked failed by GitHub anyway (the sweep catches up later).
_LOCK_TIMEOUT = "2s"
# A transaction of the bridge's own left open (a bug, a stalled event loop) must not hold
# its locks for long: PostgreSQL ends the session, the pool replaces the connection.
_IDLE_IN_TRANSACTION_TIMEOUT = "10s"
# Intake also bounds each of its statements: work.INTAKE_STATEMENT_TIMEOUT.
# How long the pool keeps re-trying a lost connection on its own, with waits doubling
# from 1 s (psycopg_pool's default, 300 s, let them grow to a minute and more, so the
# queue stayed unavailable for that long after the server was back). Once it gives up,
# the next request for a connection starts a new try at once; requests come often (the
# forwarder's polls, /readyz), so a connection is back within ~2 s of the server.
_RECONNECT_SECONDS = 5.0
_RETRIES = 5
# Worth another try of the whole transaction: nothing of it was committed.
_TRANSIENT = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
# What one delivery can cause (a value PostgreSQL refuses), unlike the server being away.
_DATA = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError)


class _Refused(QueueUnavailable):
    """PostgreSQL refused what a transaction wrote (not: the server is unreachable)."""


class PostgresQueue:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        url: str,
        *,
        lease_seconds: float,
        retention_days: float,
    ) -> None:
        self._pool = pool
        self._url = url
        self._lease = lease_seconds
        self._retention = retention_days * 86_400
        self._claims: dict[int, tuple[int, str]] = {}  # job id → (claim token, lane)
        self._adds: Batcher[NewDelivery, Added] = Batcher(
            self._add_batch, max_batch=_MAX_BATCH, name="postgres-adds"
        )
        self._settles: Batcher[work.SettleItem, bool] = Batcher(
            self._settle_batch, max_batch=_MAX_BATCH, name="postgres-settles"
        )

    @classmethod
    async def open(cls, url: str, *, lease_seconds: float, retention_days: float) -> PostgresQueue:
        """Connect, create or migrate the schema (safe with replicas starting at once)."""
        shown = masked(url)
        try:
            conn = await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=int(_CONNECT_SECONDS)
            )
            async with conn:
                found = await migrate(conn)
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                url,
                min_size=2,
                max_size=_POOL_SIZE,
                kwargs={"autocommit": True, "connect_timeout": int(_CONNECT_SECONDS)},
                configure=_configure,
                reconnect_timeout=_RECONNECT_SECONDS,
                check=AsyncConnectionPool.check_connection,
                open=False,
                name="vela-bridge",
            )
            try:
                await pool.open(wait=True, timeout=_CONNECT_SECONDS)
            except BaseException:
                await pool.close()
                raise
        except (psycopg.Error, OSError) as exc:
            raise QueueUnavailable(
                f"cannot open the PostgreSQL queue {shown}: {scrub(str(exc), url)}"
            ) from None
        log.info("PostgreSQL queue %s open (schema was version %d)", shown, found)
        return cls(pool, url, lease_seconds=lease_seconds, retention_days=retention_days)

    # -- transactions --------------------------------------------------------------------

    async def _tx(self, op: Callable[[Conn], Awaitable[T]], *, mode: str = "write") -> T:
        """Run ``op`` in one transaction; retried whole on a deadlock or serialisation error.

        ``mode``: "write"; "pipeline" (a write whose statements are sent without waiting
        for each answer: fewer round trips); "snapshot" (several reads that must agree:
        REPEATABLE READ, READ ONLY); or "single" (one statement, its own transaction).
        """
        for attempt in range(1, _RETRIES + 1):
            try:
                async with self._pool.connection(timeout=_CONNECT_SECONDS) as conn:
                    if mode == "single":
                        return await op(conn)
                    if mode == "pipeline":
                        # Statements are sent without waiting; a fetch waits for all so far.
                        async with conn.pipeline(), conn.transaction():
                            return await op(conn)
                    async with conn.transaction():
                        if mode == "snapshot":
                            await conn.execute(
                                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                            )
                        return await op(conn)
            except _TRANSIENT as exc:
                if attempt == _RETRIES:
                    raise self._unavailable(exc) from None
                log.info("queue transaction retried after: %s", scrub(str(exc), self._url))
                await asyncio.sleep(random.uniform(0, 0.01 * attempt))
            except (psycopg.Error, OSError) as exc:
                raise self._unavailable(exc) from None
        raise AssertionError("unreachable")

    def _unavailable(self, exc: BaseException) -> QueueUnavailable:
        # A lock or statement timeout (lock_not_available, query_canceled) is the server
        # being unavailable, not the data: a 503, and no retry that would wait again.
        kind = _Refused if isinstance(exc, _DATA) else QueueUnavailable
        return kind(f"the PostgreSQL queue failed: {scrub(str(exc), self._url)}")

    # -- intake --------------------------------------------------------------------------

    async def add(self, delivery: NewDelivery) -> Added:
        return await self._adds.submit(delivery)

    async def _add_batch(self, batch: Sequence[NewDelivery]) -> Sequence[Added | Exception]:
        try:
            return await self._tx(lambda conn: work.add_many(conn, batch), mode="pipeline")
        except _Refused as exc:
            if len(batch) == 1:
                raise
            # One bad delivery must not cost the others their 202: try each on its own.
            log.warning("a batch of %d deliveries failed (%s); storing one by one", len(batch), exc)
            results: list[Added | Exception] = []
            for delivery in batch:
                try:
                    one_op = functools.partial(work.add_one, delivery)
                    results.extend(await self._tx(one_op, mode="pipeline"))
                except QueueUnavailable as one:
                    results.append(one)
            return results

    # -- workers -------------------------------------------------------------------------

    async def claim(self, limit: int, now: float) -> list[ClaimedJob]:
        if limit <= 0:
            return []
        token = secrets.randbits(62)
        params = {"now": now, "limit": limit, "lease": now + self._lease, "token": token}

        async def op(conn: Conn) -> list[tuple[Any, ...]]:
            rows = await (await conn.execute(CLAIM_SQL, params)).fetchall()
            await refresh(conn, [row[13] for row in rows], now)
            return rows

        claimed = []
        for row in sorted(await self._tx(op, mode="pipeline"), key=lambda r: r[0]):
            self._claims[row[0]] = (token, row[14])
            claimed.append(
                ClaimedJob(
                    id=row[0], guid=row[1], number=row[2], endpoint=row[3], org=row[4],
                    repo=row[5], path=row[6], body=row[7], attempts=row[8],
                    first_attempt_at=row[9], unclear=row[10], github_event=row[11],
                    action=row[12], fallback=row[15], claim=token, first_claimed_at=row[16],
                    last_attempt_at=row[17], last_error=row[18],
                )
            )  # fmt: skip
        return claimed

    async def settle(
        self, job_id: int, settlement: Settlement, now: float, claim: int | None = None
    ) -> bool:
        held = self._claims.get(job_id)  # this queue's latest claim of the job
        token = held[0] if claim is None and held is not None else claim
        lane = None
        if held is not None and held[0] == token:
            del self._claims[job_id]
            lane = held[1]
        return await self._settles.submit(work.SettleItem(job_id, settlement, now, token, lane))

    async def _settle_batch(self, batch: Sequence[work.SettleItem]) -> Sequence[Exception | bool]:
        return await self._tx(lambda conn: work.settle_many(conn, batch), mode="pipeline")

    async def release(self, job_ids: Sequence[int], now: float) -> None:
        # Only the claims this queue holds, each matched on its token: a job with none
        # here (settled meanwhile, then claimed by another replica, say) is not ours to free.
        held = {i: self._claims.pop(i) for i in set(job_ids) if i in self._claims}
        ids = sorted(held)
        tokens = [held[i][0] for i in ids]

        async def op(conn: Conn) -> None:
            await conn.execute(
                "SELECT id FROM jobs WHERE id = ANY(%s::int8[]) ORDER BY id FOR NO KEY UPDATE",
                (ids,),
            )
            cur = await conn.execute(
                "UPDATE jobs j SET state = 'retrying', lease_until = NULL, claim_token = NULL,"
                " unclear = true, next_attempt_at = %s"
                " FROM unnest(%s::int8[], %s::int8[]) AS u (id, token) WHERE j.id = u.id"
                " AND j.state = 'running' AND j.claim_token = u.token"
                " RETURNING j.delivery_id",
                (now, ids, tokens),
            )
            await refresh(conn, [row[0] for row in await cur.fetchall()], now)

        if ids:
            await self._tx(op)

    async def next_due(self) -> float | None:
        async def op(conn: Conn) -> float | None:
            cur = await conn.execute(
                f"SELECT min(due_at) FROM jobs WHERE head AND state IN {ACTIVE_SQL}"
            )
            row = await cur.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._tx(op, mode="single")

    # -- operators -----------------------------------------------------------------------

    async def delivery(self, guid: str) -> DeliveryRecord | None:
        return await self._tx(lambda conn: history.by_guid(conn, guid), mode="snapshot")

    async def build(self, repo: str, number: int) -> DeliveryRecord:
        return await self._tx(lambda conn: history.build(conn, repo, number), mode="snapshot")

    async def builds(self, repo: str, status: str | None, page: Page) -> list[DeliveryRecord]:
        return await self._tx(
            lambda conn: history.builds(conn, repo, status, page), mode="snapshot"
        )

    async def deliveries(
        self, guid: str | None, status: str | None, event: str | None, page: Page
    ) -> list[DeliveryRecord]:
        return await self._tx(
            lambda conn: history.deliveries(conn, guid, status, event, page), mode="snapshot"
        )

    async def restart(
        self, repo: str, number: int, reconvert: Reconvert, now: float
    ) -> DeliveryRecord:
        return await self._tx(lambda conn: history.restart(conn, repo, number, reconvert, now))

    async def cancel(self, repo: str, number: int, job: int, now: float) -> DeliveryRecord:
        return await self._tx(lambda conn: history.cancel(conn, repo, number, job, now))

    async def job_log(self, repo: str, number: int, job: int) -> tuple[JobRecord, list[Attempt]]:
        return await self._tx(
            lambda conn: history.job_log(conn, repo, number, job), mode="snapshot"
        )

    # -- talking back to GitHub, metrics ------------------------------------------------

    async def is_vela_deployment(self, repo: str, number: int) -> bool:
        if not 0 <= number < 2**63:
            return False
        row = await self._one(
            "SELECT 1 FROM vela_deployments WHERE repo_key = %s AND number = %s",
            (clean(repo).lower(), number),
        )
        return row is not None

    async def payload(self, guid: str) -> bytes | None:
        row = await self._one("SELECT payload FROM deliveries WHERE guid = %s", (clean(guid),))
        return None if row is None else row[0]

    async def report_state(self, guid: str, state: str) -> bool:
        async def op(conn: Conn) -> bool:
            cur = await conn.execute(
                "INSERT INTO reports (guid, state) VALUES (%s, %s) ON CONFLICT (guid)"
                " DO UPDATE SET state = excluded.state WHERE reports.state <> excluded.state",
                (clean(guid), clean(state)),
            )
            return cur.rowcount > 0

        return await self._tx(op, mode="single")

    async def try_lead(self, name: str, holder: str, ttl: float, now: float) -> bool:
        async def op(conn: Conn) -> bool:
            cur = await conn.execute(
                "INSERT INTO leases (name, holder, until) VALUES (%s, %s, %s) ON CONFLICT (name)"
                " DO UPDATE SET holder = excluded.holder, until = excluded.until"
                " WHERE leases.holder = excluded.holder OR leases.until < %s RETURNING holder",
                (clean(name), clean(holder), now + ttl, now),
            )
            return await cur.fetchone() is not None

        return await self._tx(op, mode="single")

    async def stats(self, now: float) -> tuple[int, float]:
        row = await self._one(
            f"SELECT count(*), min(enqueued_at) FROM jobs WHERE state IN {ACTIVE_SQL}", ()
        )
        assert row is not None
        count, oldest = row
        return int(count), max(0.0, now - oldest) if oldest is not None else 0.0

    async def _one(self, sql: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        async def op(conn: Conn) -> tuple[Any, ...] | None:
            return await (await conn.execute(sql, args)).fetchone()

        return await self._tx(op, mode="single")

    # -- upkeep --------------------------------------------------------------------------

    async def ping(self) -> None:
        """Ready means the server takes a write now: one that leaves nothing. SELECT 1
        also answers on a server that has turned read-only (a standby after a failover,
        a full disk that stopped its log) while intake answers 503."""
        name = f"readiness {secrets.token_hex(8)}"  # replicas probe at once: a name each

        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO leases (name, holder, until) VALUES (%s, '', 0)", (name,)
            )
            await conn.execute("DELETE FROM leases WHERE name = %s", (name,))

        await self._tx(op)

    async def purge(self, now: float) -> int:
        bodies_before = now - self._retention
        rows_before = now - max(self._retention, _DEDUPE_SECONDS)
        touched = await self._tx(lambda conn: work.purge_bodies(conn, bodies_before))
        while True:
            removed = await self._tx(lambda conn: work.purge_rows(conn, rows_before))
            touched += removed
            if removed < work.PURGE_CHUNK:
                break
        await self._tx(lambda conn: work.purge_other(conn, rows_before))
        return touched

    async def close(self) -> None:
        try:
            await self._adds.close()
            await self._settles.close()
        finally:
            await self._pool.close()


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Session settings, in one round trip: the lock and idle timeouts above; and
    interface.md: a 2xx survives a power cut, so a commit must wait for the WAL flush."""
    cur = await conn.execute(
        "SELECT current_setting('synchronous_commit'), set_config('lock_timeout', %s, false),"
        " set_config('idle_in_transaction_session_timeout', %s, false)",
        (_LOCK_TIMEOUT, _IDLE_IN_TRANSACTION_TIMEOUT),
    )
    row = await cur.fetchone()
    if row is not None and row[0] == "off":
        await conn.execute("SET synchronous_commit = on")
