"""The PostgreSQL queue's operator side: reading history, restarting, cancelling.

Reads run in one REPEATABLE READ snapshot, so a delivery and its jobs agree.
Restarts and cancels are serialised across replicas by an advisory lock, then
lock their lanes and job rows before they look at the states that decide 409:
a claim (``SKIP LOCKED``) cannot take a job an operator is changing, and an
operator never changes a job a worker holds (running: 409).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from bridge.errors import Conflict, NotFound
from bridge.queue import Attempt, DeliveryRecord, JobRecord, NewJob, Page, Reconvert
from bridge.queue._postgres_rows import (
    Conn,
    insert_jobs,
    lane_lock,
    lock,
    promote,
    refresh,
)
from bridge.queue._postgres_schema import ACTIVE_SQL, NS_OPERATOR
from bridge.queue._records import (
    DELIVERY_COLUMNS,
    JOB_COLUMNS,
    build_records,
    delivery_filters,
)
from bridge.states import ACTIVE, FINISHED, JobState, check

_BIGINT = 2**63 - 1


def clean(text: str) -> str:
    """Text PostgreSQL can store: no NUL, valid UTF-8 (SQLite takes both; PostgreSQL neither)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode(errors="replace").decode()
    return text


def clean_job(j: NewJob) -> NewJob:
    texts = (j.endpoint, j.org, j.repo, j.path, j.lane)
    if all(clean(t) == t for t in texts):
        return j
    return NewJob(clean(j.endpoint), clean(j.org), clean(j.repo), clean(j.path), j.body,
                  clean(j.lane), j.fallback)  # fmt: skip


async def records(conn: Conn, rows: Sequence[Sequence[Any]]) -> list[DeliveryRecord]:
    """Delivery rows (``DELIVERY_COLUMNS``) with their jobs, read in one more query."""
    if not rows:
        return []
    ids = [row[0] for row in rows]
    cur = await conn.execute(
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE delivery_id = ANY(%s::int8[]) ORDER BY number",
        (ids,),
    )
    return build_records(rows, await cur.fetchall())


async def _select(conn: Conn, where: str, args: Sequence[Any]) -> list[DeliveryRecord]:
    cur = await conn.execute(f"SELECT {DELIVERY_COLUMNS} FROM deliveries {where}", args)
    return await records(conn, await cur.fetchall())


def _window(page: Page) -> tuple[int, int]:
    return min(page.per_page, _BIGINT), min((page.page - 1) * page.per_page, _BIGINT)


async def by_guid(conn: Conn, guid: str) -> DeliveryRecord | None:
    found = await _select(conn, "WHERE guid = %s", (clean(guid),))
    return found[0] if found else None


async def build(conn: Conn, repo: str, number: int) -> DeliveryRecord:
    found = []
    if 0 <= number <= _BIGINT:
        found = await _select(
            conn, "WHERE repo_key = %s AND number = %s", (clean(repo).lower(), number)
        )
    if not found:
        raise NotFound(f"{repo} has no build {number}")
    return found[0]


async def builds(conn: Conn, repo: str, status: str | None, page: Page) -> list[DeliveryRecord]:
    key = clean(repo).lower()
    # Not the repos table: its counter outlives the deliveries that retention deletes.
    cur = await conn.execute("SELECT 1 FROM deliveries WHERE repo_key = %s LIMIT 1", (key,))
    if await cur.fetchone() is None:
        raise NotFound(f"no delivery for {repo} is stored")
    where, args = "WHERE repo_key = %s", [key]
    if status is not None:
        where, args = where + " AND status = %s", [*args, clean(status)]
    return await _select(
        conn, where + " ORDER BY number DESC LIMIT %s OFFSET %s", [*args, *_window(page)]
    )


async def deliveries(
    conn: Conn, guid: str | None, status: str | None, event: str | None, page: Page
) -> list[DeliveryRecord]:
    filters = delivery_filters(guid, status, event)
    clauses = [f"{column} = %s" for column, _ in filters]
    args: list[Any] = [clean(value) for _, value in filters]
    where = "WHERE " + " AND ".join(clauses) if clauses else ""
    return await _select(
        conn, where + " ORDER BY id DESC LIMIT %s OFFSET %s", [*args, *_window(page)]
    )


async def restart(
    conn: Conn, repo: str, number: int, reconvert: Reconvert, now: float
) -> DeliveryRecord:
    await lock(conn, [(NS_OPERATOR, 0)])
    delivery = await build(conn, repo, number)
    cur = await conn.execute("SELECT lane FROM jobs WHERE delivery_id = %s", (delivery.id,))
    lanes = {r[0] for r in await cur.fetchall()}
    converted: tuple[NewJob, ...] | str = ()
    if not delivery.jobs and delivery.has_payload:
        cur = await conn.execute(
            "SELECT payload, event FROM deliveries WHERE id = %s", (delivery.id,)
        )
        row = await cur.fetchone()
        if row is not None and row[0] is not None:
            converted = reconvert(delivery.github_event, row[0])
            if not isinstance(converted, str):
                converted = tuple(clean_job(job) for job in converted)
                lanes |= {job.lane for job in converted}
    await lock(conn, [lane_lock(lane) for lane in lanes])
    await conn.execute(
        "SELECT id FROM jobs WHERE delivery_id = %s ORDER BY id FOR NO KEY UPDATE", (delivery.id,)
    )
    delivery = await build(conn, repo, number)  # again, now that nothing can change it
    if any(job.state == JobState.RUNNING for job in delivery.jobs):
        raise Conflict("a job of this delivery is in flight; restart it once its attempt settles")
    if not delivery.has_payload or not all(job.has_body for job in delivery.jobs):
        raise Conflict("its payload was deleted by queue.retention_days; it cannot be restarted")
    if not delivery.jobs:
        if isinstance(converted, str):
            raise Conflict(f"nothing to forward: {converted}")
        await insert_jobs(
            conn, [(delivery.id, i, job, now) for i, job in enumerate(converted, start=1)]
        )
        if not delivery.event:
            await conn.execute(
                "UPDATE deliveries SET event = %s WHERE id = %s",
                (clean(orjson.loads(converted[0].body).get("event", "")), delivery.id),
            )
    for job in delivery.jobs:
        if job.state not in ACTIVE:
            check(job.state, JobState.PENDING)
        await conn.execute(
            "UPDATE jobs SET state = 'pending', attempts = 0, first_attempt_at = NULL,"
            " next_attempt_at = %s, unclear = false, error = '', exit_code = 0,"
            " vela_number = NULL, vela_link = '', enqueued_at = %s, started_at = NULL,"
            " finished_at = NULL, lease_until = NULL, claim_token = NULL,"
            " head = head OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.lane = jobs.lane"
            f" AND o.id <> jobs.id AND o.state IN {ACTIVE_SQL}) WHERE id = %s",
            (now, now, job.id),
        )
    await conn.execute(
        "UPDATE deliveries SET enqueued_at = %s, started_at = NULL, finished_at = NULL"
        " WHERE id = %s",
        (now, delivery.id),
    )
    await refresh(conn, [delivery.id], now)
    return await build(conn, repo, number)


async def cancel(conn: Conn, repo: str, number: int, job: int, now: float) -> DeliveryRecord:
    await lock(conn, [(NS_OPERATOR, 0)])
    delivery = await build(conn, repo, number)
    found = [j for j in delivery.jobs if j.number == job]
    if not found:
        raise NotFound(f"build {number} of {repo} has no job {job}")
    job_id = found[0].id
    cur = await conn.execute("SELECT lane FROM jobs WHERE id = %s", (job_id,))
    row = await cur.fetchone()
    if row is None:  # purged meanwhile
        raise NotFound(f"build {number} of {repo} has no job {job}")
    lane: str = row[0]
    await lock(conn, [lane_lock(lane)])
    cur = await conn.execute(
        "SELECT state, head FROM jobs WHERE id = %s FOR NO KEY UPDATE", (job_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"build {number} of {repo} has no job {job}")
    state, head = JobState(row[0]), bool(row[1])
    if state == JobState.RUNNING:
        raise Conflict("the job is in flight right now; cancel it again once its attempt settles")
    if state in FINISHED:
        raise Conflict(f"the job already finished ({state})")
    check(state, JobState.KILLED)
    await conn.execute(
        "UPDATE jobs SET state = 'killed', head = false, error = 'cancelled by an operator',"
        " finished_at = %s WHERE id = %s",
        (now, job_id),
    )
    if head:
        await promote(conn, [lane])
    await refresh(conn, [delivery.id], now)
    return await build(conn, repo, number)


async def job_log(conn: Conn, repo: str, number: int, job: int) -> tuple[JobRecord, list[Attempt]]:
    delivery = await build(conn, repo, number)
    found = [j for j in delivery.jobs if j.number == job]
    if not found:
        raise NotFound(f"build {number} of {repo} has no job {job}")
    cur = await conn.execute(
        "SELECT started_at, duration, http_status, error, excerpt FROM attempts"
        " WHERE job_id = %s ORDER BY id",
        (found[0].id,),
    )
    attempts = [
        Attempt(started_at=a[0], duration=a[1], http_status=a[2], error=a[3], excerpt=a[4])
        for a in await cur.fetchall()
    ]
    return found[0], attempts
