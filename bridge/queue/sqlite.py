"""The SQLite queue: one file in WAL mode, synchronous=FULL, owned by one process.

Every statement runs on the group-commit thread (:mod:`bridge.queue._writer`).
Lanes keep order (interface.md "Order"): among the active jobs of a lane exactly
one, the oldest, is the *head*, and only heads are claimed. The partial index
``jobs_ready`` holds just the claimable heads, so a claim costs O(log n) however
long the backlog is; bodies are never scanned.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import orjson

from bridge.errors import QueueLocked, QueueUnavailable
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
from bridge.queue import _sqlite_history as history
from bridge.queue._sqlite_rows import ACTIVE_SQL, insert_jobs, promote, refresh_delivery
from bridge.queue._writer import Writer
from bridge.states import FINISHED, JobState, check, delivery_status

log = logging.getLogger("bridge.queue")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    key TEXT PRIMARY KEY,
    last_number INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    guid TEXT NOT NULL UNIQUE,
    repo TEXT NOT NULL,
    repo_key TEXT NOT NULL,
    number INTEGER,
    github_event TEXT NOT NULL,
    action TEXT NOT NULL,
    event TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_repo ON deliveries (repo_key, number);
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    number INTEGER NOT NULL,
    state TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    org TEXT NOT NULL,
    repo TEXT NOT NULL,
    path TEXT NOT NULL,
    lane TEXT NOT NULL,
    head INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    claim INTEGER,
    unclear INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    vela_number INTEGER,
    vela_link TEXT NOT NULL DEFAULT '',
    enqueued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_delivery ON jobs (delivery_id);
CREATE INDEX IF NOT EXISTS jobs_lane ON jobs (lane, id)
    WHERE state IN ('pending', 'running', 'retrying');
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (next_attempt_at)
    WHERE head = 1 AND state IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (id) WHERE state = 'running';
-- Written once, read rarely: kept out of the rows that every claim and settle rewrite,
-- so an 8 KB payload is not copied again at each state change.
CREATE TABLE IF NOT EXISTS delivery_data (
    delivery_id INTEGER PRIMARY KEY,
    summary BLOB NOT NULL,
    payload BLOB
);
CREATE TABLE IF NOT EXISTS job_bodies (
    job_id INTEGER PRIMARY KEY,
    body BLOB,
    fallback BLOB
);
CREATE TABLE IF NOT EXISTS vela_deployments (
    repo_key TEXT NOT NULL,
    number INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (repo_key, number)
);
CREATE TABLE IF NOT EXISTS reports (
    guid TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    started_at REAL NOT NULL,
    duration REAL NOT NULL,
    http_status INTEGER,
    error TEXT NOT NULL,
    excerpt TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id);
"""


def _claimable(unclear: str, where: str) -> str:
    """The claim's SELECT: a ClaimedJob's columns (``unclear`` as given), with when the
    job's latest attempt ended (through the index attempts_job) and its latest error."""
    return (
        "SELECT j.id, d.guid, j.number, j.endpoint, j.org, j.repo, j.path, b.body, j.attempts,"
        f" j.first_attempt_at, {unclear}, d.github_event, d.action, j.delivery_id, b.fallback,"
        " j.started_at,"
        " (SELECT max(a.started_at + a.duration) FROM attempts a WHERE a.job_id = j.id),"
        " j.error"
        " FROM jobs j JOIN deliveries d ON d.id = j.delivery_id"
        f" JOIN job_bodies b ON b.job_id = j.id WHERE {where}"
    )


# Due heads of their lanes, through the partial index jobs_ready: O(log n) in the backlog.
CLAIM_SQL = _claimable(
    "j.unclear",
    "j.head = 1 AND j.state IN ('pending', 'retrying') AND j.next_attempt_at <= ?"
    " ORDER BY j.next_attempt_at LIMIT ?",
)
# Claims whose lease ran out while the process lived (an attempt that could not settle):
# taken again, as unclear. Few rows: only running jobs are in the jobs_running index.
EXPIRED_SQL = _claimable("1", "j.state = 'running' AND j.lease_until < ? LIMIT ?")
_DEDUPE_SECONDS = 7 * 86_400  # interface.md: GUIDs are kept at least 7 days


class SQLiteQueue:
    def __init__(self, writer: Writer, lock: int, *, lease_seconds: float, retention_days: float):
        self._writer = writer
        self._lock = lock
        self._lease = lease_seconds
        self._retention = retention_days * 86_400
        # Each claim's number (jobs.claim): a job whose lease ran out is claimed again with
        # a new one. One process owns the file, so numbering per process is enough.
        self._claim_numbers = itertools.count(1)

    @classmethod
    async def open(cls, path: str, *, lease_seconds: float, retention_days: float) -> SQLiteQueue:
        """Open (creating) the file, take the one-process lock (or reserve()'s), release stale
        claims."""
        # Through any symlink: SQLite writes its log beside the real file, and that log is
        # the one to sync and the file the lock must cover.
        file = Path(path).resolve()
        lock = _reserved.pop(file, None)
        if lock is None:
            lock = _lock(file)
        writer = Writer(lambda: _connect(file), file, _add_many)
        try:
            writer.start()
        except (sqlite3.Error, OSError) as exc:
            os.close(lock)
            raise QueueUnavailable(f"cannot open the SQLite queue {file}: {exc}") from None
        queue = cls(writer, lock, lease_seconds=lease_seconds, retention_days=retention_days)
        # One process owns the file, so every claim found now belongs to a dead process.
        now = time.time()
        try:
            await writer.run(lambda conn: _release_all(conn, now))
        except BaseException:
            await queue.close()  # the writer and the lock: a retry must find the file free
            raise
        return queue

    async def add(self, delivery: NewDelivery) -> Added:
        added: Added = await self._writer.add(delivery)  # the bulk call: _add_many
        return added

    # A claim's number is written in its jobs' rows (jobs.claim) and a settlement compares
    # it there, in the transaction that records it: a check made when settle() is called
    # could pass for a claim that another, already queued (or written and not yet
    # returned), is about to take over; and a note kept in memory would survive a batch
    # that the writer rolls back and runs again.

    async def claim(self, limit: int, now: float) -> list[ClaimedJob]:
        number = next(self._claim_numbers)
        lease = now + self._lease
        return await self._writer.run(lambda conn: _claim(conn, limit, now, lease, number))

    async def settle(
        self, job_id: int, settlement: Settlement, now: float, claim: int | None = None
    ) -> bool:
        outcome = await self._writer.run(lambda conn: _settle(conn, job_id, settlement, now, claim))
        if outcome == "retaken":
            log.warning(
                "job %d: its lease expired and was retaken; outcome %s not recorded",
                job_id,
                settlement.state,
            )
        return outcome == "recorded"

    async def release(self, job_ids: Sequence[int], now: float) -> None:
        await self._writer.run(lambda conn: _release(conn, job_ids, now))

    async def next_due(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM jobs"
                " WHERE head = 1 AND state IN ('pending', 'retrying')"
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._writer.run(op)

    async def delivery(self, guid: str) -> DeliveryRecord | None:
        return await self._writer.run(lambda conn: history.by_guid(conn, guid))

    async def build(self, repo: str, number: int) -> DeliveryRecord:
        return await self._writer.run(lambda conn: history.build(conn, repo, number))

    async def builds(self, repo: str, status: str | None, page: Page) -> list[DeliveryRecord]:
        return await self._writer.run(lambda conn: history.builds(conn, repo, status, page))

    async def deliveries(
        self, guid: str | None, status: str | None, event: str | None, page: Page
    ) -> list[DeliveryRecord]:
        return await self._writer.run(
            lambda conn: history.deliveries(conn, guid, status, event, page)
        )

    async def restart(
        self, repo: str, number: int, reconvert: Reconvert, now: float
    ) -> DeliveryRecord:
        return await self._writer.run(
            lambda conn: history.restart(conn, repo, number, reconvert, now)
        )

    async def cancel(self, repo: str, number: int, job: int, now: float) -> DeliveryRecord:
        return await self._writer.run(lambda conn: history.cancel(conn, repo, number, job, now))

    async def job_log(self, repo: str, number: int, job: int) -> tuple[JobRecord, list[Attempt]]:
        return await self._writer.run(lambda conn: history.job_log(conn, repo, number, job))

    async def is_vela_deployment(self, repo: str, number: int) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "SELECT 1 FROM vela_deployments WHERE repo_key = ? AND number = ?",
                    (repo.lower(), number),
                ).fetchone()
                is not None
            )

        return await self._writer.run(op)

    async def payload(self, guid: str) -> bytes | None:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT x.payload FROM deliveries d JOIN delivery_data x ON x.delivery_id = d.id"
                " WHERE d.guid = ?",
                (guid,),
            ).fetchone()
            return None if row is None else row[0]

        return await self._writer.run(op)

    async def report_state(self, guid: str, state: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "INSERT INTO reports (guid, state) VALUES (?, ?) ON CONFLICT (guid)"
                " DO UPDATE SET state = excluded.state WHERE reports.state <> excluded.state",
                (guid, state),
            ).rowcount
            return bool(changed)

        return await self._writer.run(op)

    async def try_lead(self, name: str, holder: str, ttl: float, now: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name)"
                " DO UPDATE SET holder = excluded.holder, until = excluded.until"
                " WHERE leases.holder = excluded.holder OR leases.until < ?"
                " RETURNING holder",
                (name, holder, now + ttl, now),
            ).fetchone()
            return row is not None

        return await self._writer.run(op)

    async def stats(self, now: float) -> tuple[int, float]:
        def op(conn: sqlite3.Connection) -> tuple[int, float]:
            count, oldest = conn.execute(
                f"SELECT COUNT(*), MIN(enqueued_at) FROM jobs WHERE state IN {ACTIVE_SQL}"
            ).fetchone()
            return int(count), max(0.0, now - oldest) if oldest is not None else 0.0

        return await self._writer.run(op)

    async def ping(self) -> None:
        """Ready means a delivery can be stored now: store one and delete it again.

        SELECT 1 answers on a full disk or a read-only file while intake answers 503; the
        probe goes the way of a delivery (the deliveries tables, COMMIT, the log's sync),
        so /readyz fails exactly when intake would, and passes again once it would not.
        After a failed sync the writer refuses every call, this one too (fail-stop)."""
        await self._writer.run(_probe)

    async def purge(self, now: float) -> int:
        return await self._writer.run(
            lambda conn: _purge(
                conn, now - self._retention, now - max(self._retention, _DEDUPE_SECONDS)
            )
        )

    async def close(self) -> None:
        try:
            await self._writer.stop()
        finally:
            os.close(self._lock)  # whatever stopping the writer met: the file is free again


# Locks taken by reserve() for this process, each until open() takes it over.
_reserved: dict[Path, int] = {}


def reserve(path: str) -> None:
    """Take the file's lock now, before a server starts, and keep it for open().

    Raises QueueLocked (or QueueUnavailable) as open() would. Keeping the lock, rather
    than letting go of it until the lifespan opens the queue, leaves no moment for a
    second ``serve`` started together with this one to take the file in between: that
    one is refused here, with the same clear message, and not in the lifespan."""
    file = Path(path).resolve()
    if file not in _reserved:
        _reserved[file] = _lock(file)


def _lock(file: Path) -> int:
    """Take an exclusive lock beside the file; the kernel drops it when the process dies."""
    lock_path = file.with_name(file.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise QueueUnavailable(f"cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QueueLocked(
            f"another vela-bridge process is using {file}; one process owns a SQLite queue"
            " (several replicas need PostgreSQL)"
        ) from None
    return fd


def _connect(file: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    # Durability: the writer syncs the WAL after each batch (bridge.queue._writer).
    conn.execute("PRAGMA busy_timeout = 2000")  # on the event loop: wait little for a lock
    conn.executescript(_SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if "claim" not in columns:  # a file from before claims were written in the rows
        conn.execute("ALTER TABLE jobs ADD COLUMN claim INTEGER")
    return conn


def _add_many(conn: sqlite3.Connection, batch: Sequence[NewDelivery]) -> list[Added]:
    """Store a batch of deliveries with a handful of statements, whatever its size.

    Intake's hot path: one statement per table for the whole batch (``executemany``)
    rather than seven per delivery. Row ids are assigned here, as SQLite would assign
    them (the largest plus one): the writer's transaction is the only one.
    """
    marks = ", ".join("?" * len(batch))
    seen = {
        r[0]
        for r in conn.execute(
            f"SELECT guid FROM deliveries WHERE guid IN ({marks})", [d.guid for d in batch]
        )
    }
    results: list[Added] = []
    fresh: list[NewDelivery] = []
    for d in batch:
        if d.guid in seen:
            results.append(Added.DUPLICATE)
            continue
        seen.add(d.guid)
        fresh.append(d)
        results.append(Added.QUEUED if d.jobs else Added.SKIPPED)
    if not fresh:
        return results
    numbers = _numbers(conn, [d.repo.lower() for d in fresh])
    delivery_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM deliveries").fetchone()[0]
    pending = delivery_status([JobState.PENDING])
    deliveries, data, jobs = [], [], []
    for d, number in zip(fresh, numbers, strict=True):
        delivery_id += 1
        at = d.received_at
        deliveries.append(
            (
                delivery_id, d.guid, d.repo, d.repo.lower(), number, d.github_event, d.action,
                d.event, pending if d.jobs else delivery_status([]), d.skip or "", at, at,
                None if d.jobs else at,
            )
        )  # fmt: skip
        data.append((delivery_id, orjson.dumps(d.summary), d.payload))
        jobs += [(delivery_id, index, job, at) for index, job in enumerate(d.jobs, start=1)]
    conn.executemany(
        "INSERT INTO deliveries (id, guid, repo, repo_key, number, github_event, action, event,"
        " status, error, created_at, enqueued_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        deliveries,
    )
    conn.executemany(
        "INSERT INTO delivery_data (delivery_id, summary, payload) VALUES (?, ?, ?)", data
    )
    insert_jobs(conn, jobs)
    return results


# The readiness probe: a delivery with no jobs and a GUID GitHub cannot send (intake's
# pattern has no space), never seen outside the probe's own transaction.
_PROBE = NewDelivery(
    guid="readiness probe",
    github_event="",
    action="",
    repo="",
    event="",
    summary={},
    payload=b"",
    skip="readiness probe",
    jobs=(),
    received_at=0.0,
)


def _probe(conn: sqlite3.Connection) -> None:
    _add_many(conn, [_PROBE])
    conn.execute(
        "DELETE FROM delivery_data WHERE delivery_id IN (SELECT id FROM deliveries WHERE guid = ?)",
        (_PROBE.guid,),
    )
    conn.execute("DELETE FROM deliveries WHERE guid = ?", (_PROBE.guid,))


def _numbers(conn: sqlite3.Connection, repo_keys: list[str]) -> list[int | None]:
    """The next build numbers of each repository, one per delivery, in order (None: no repo)."""
    wanted: dict[str, int] = {}
    for key in repo_keys:
        if key:
            wanted[key] = wanted.get(key, 0) + 1
    following: dict[str, int] = {}
    for key, count in wanted.items():
        last = conn.execute(
            "INSERT INTO repos (key, last_number) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET last_number = last_number + excluded.last_number"
            " RETURNING last_number",
            (key, count),
        ).fetchone()[0]
        following[key] = last - count + 1
    numbers: list[int | None] = []
    for key in repo_keys:
        if not key:
            numbers.append(None)
            continue
        numbers.append(following[key])
        following[key] += 1
    return numbers


def _claim(
    conn: sqlite3.Connection, limit: int, now: float, lease_until: float, number: int
) -> list[ClaimedJob]:
    rows = conn.execute(EXPIRED_SQL, (now, limit)).fetchall()
    if len(rows) < limit:
        rows += conn.execute(CLAIM_SQL, (now, limit - len(rows))).fetchall()
    if not rows:
        return []
    conn.executemany(
        "UPDATE jobs SET state = 'running', lease_until = ?, claim = ?, unclear = ?,"
        " started_at = COALESCE(started_at, ?) WHERE id = ?",
        [(lease_until, number, row[10], now, row[0]) for row in rows],
    )
    # A delivery with a running job is running, whatever its other jobs do (states.py),
    # so the claimed jobs' deliveries need no look at their other jobs.
    deliveries = sorted({row[13] for row in rows})
    conn.execute(
        "UPDATE deliveries SET status = ?, started_at = COALESCE(started_at, ?),"
        f" finished_at = NULL WHERE id IN ({', '.join('?' * len(deliveries))})",
        [delivery_status([JobState.RUNNING]), now, *deliveries],
    )
    claimed = []
    for row in rows:
        claimed.append(
            ClaimedJob(
                id=row[0],
                guid=row[1],
                number=row[2],
                endpoint=row[3],
                org=row[4],
                repo=row[5],
                path=row[6],
                body=row[7],
                attempts=row[8],
                first_attempt_at=row[9],
                unclear=bool(row[10]),
                github_event=row[11],
                action=row[12],
                fallback=row[14],
                claim=number,
                first_claimed_at=now if row[15] is None else row[15],
                last_attempt_at=row[16],
                last_error=row[17],
            )
        )
    return claimed


def _settle(
    conn: sqlite3.Connection, job_id: int, s: Settlement, now: float, claim: int | None
) -> Literal["recorded", "retaken", "gone"]:
    """Record ``s`` for the job, unless ``claim`` is no longer the job's (its lease ran
    out and the job was claimed again: only the attempt is kept) or the job is gone."""
    row = conn.execute(
        "SELECT state, delivery_id, lane, head, claim FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    if row is None:  # purged meanwhile
        return "gone"
    if claim is not None and row[4] != claim:
        if s.attempt is not None:
            _log_attempt(conn, job_id, s.attempt)
        return "retaken"
    old, delivery_id, lane, head = JobState(row[0]), row[1], row[2], row[3]
    check(old, s.state)
    finished = s.state in FINISHED
    a = s.attempt
    conn.execute(
        "UPDATE jobs SET state = ?, attempts = attempts + ?, lease_until = NULL,"
        " first_attempt_at = COALESCE(first_attempt_at + ?, ?), next_attempt_at = ?,"
        " unclear = ?, exit_code = COALESCE(?, exit_code), error = ?,"
        " vela_number = COALESCE(?, vela_number), vela_link = ?, finished_at = ? WHERE id = ?",
        (
            s.state,
            int(s.consumed),
            s.paused,  # not part of the job's age
            a.started_at if a and s.consumed else None,  # retry.max_age counts from it
            s.next_attempt_at or now,
            int(s.unclear),
            a.http_status if a else None,
            s.error,
            s.vela_number,
            s.vela_link,
            now if finished else None,
            job_id,
        ),
    )
    if s.vela_deployment is not None:
        conn.execute(
            "INSERT INTO vela_deployments (repo_key, number, created_at)"
            " SELECT lower(org || '/' || repo), ?, ? FROM jobs WHERE id = ?"
            " ON CONFLICT DO NOTHING",
            (s.vela_deployment, now, job_id),
        )
    if a is not None:
        _log_attempt(conn, job_id, a)
    if finished and head:
        promote(conn, job_id, lane)
    refresh_delivery(conn, delivery_id, now)
    return "recorded"


def _log_attempt(conn: sqlite3.Connection, job_id: int, a: Attempt) -> None:
    conn.execute(
        "INSERT INTO attempts (job_id, started_at, duration, http_status, error, excerpt)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (job_id, a.started_at, a.duration, a.http_status, a.error, a.excerpt),
    )


def _release(conn: sqlite3.Connection, job_ids: Sequence[int], now: float) -> None:
    for job_id in job_ids:
        row = conn.execute(
            "UPDATE jobs SET state = 'retrying', lease_until = NULL, unclear = 1,"
            " next_attempt_at = ? WHERE id = ? AND state = 'running' RETURNING delivery_id",
            (now, job_id),
        ).fetchone()
        if row is not None:
            refresh_delivery(conn, row[0], now)


def _release_all(conn: sqlite3.Connection, now: float) -> None:
    _release(conn, [r[0] for r in conn.execute("SELECT id FROM jobs WHERE state = 'running'")], now)


_PURGE_CHUNK = 500  # deliveries per purge call: each call is one short transaction


def _purge(conn: sqlite3.Connection, bodies_before: float, rows_before: float) -> int:
    """Drop finished deliveries' bodies after the retention; whole rows once dedupe allows.

    At most _PURGE_CHUNK deliveries of each kind per call, so the event loop is never
    held long; the caller calls again while something was done.
    """
    stale = [
        r[0]
        for r in conn.execute(
            "SELECT d.id FROM deliveries d JOIN delivery_data x ON x.delivery_id = d.id"
            " WHERE d.finished_at < ? AND x.payload IS NOT NULL LIMIT ?",
            (bodies_before, _PURGE_CHUNK),
        )
    ]
    marks = ", ".join("?" * len(stale))
    conn.execute(f"UPDATE delivery_data SET payload = NULL WHERE delivery_id IN ({marks})", stale)
    conn.execute(
        "UPDATE job_bodies SET body = NULL, fallback = NULL"
        f" WHERE job_id IN (SELECT id FROM jobs WHERE delivery_id IN ({marks}))",
        stale,
    )
    old = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM deliveries WHERE finished_at < ? LIMIT ?", (rows_before, _PURGE_CHUNK)
        )
    ]
    marks = ", ".join("?" * len(old))
    jobs_of = f"SELECT id FROM jobs WHERE delivery_id IN ({marks})"
    conn.execute(f"DELETE FROM attempts WHERE job_id IN ({jobs_of})", old)
    conn.execute(f"DELETE FROM job_bodies WHERE job_id IN ({jobs_of})", old)
    conn.execute(f"DELETE FROM jobs WHERE delivery_id IN ({marks})", old)
    conn.execute(f"DELETE FROM delivery_data WHERE delivery_id IN ({marks})", old)
    conn.execute(
        f"DELETE FROM reports WHERE guid IN (SELECT guid FROM deliveries WHERE id IN ({marks}))",
        old,
    )
    conn.execute(f"DELETE FROM deliveries WHERE id IN ({marks})", old)
    # Vela knows its deployments too (GET …/deployments/{id}): the record is a shortcut.
    conn.execute("DELETE FROM vela_deployments WHERE created_at < ?", (rows_before,))
    return len(stale) + len(old)
