"""The SQLite queue's operator side: reading history, restarting, cancelling.

Runs on the group-commit thread like every other statement, so a restart or a
cancel is atomic with respect to the workers' claims and settlements: a job is
either claimed (running: 409) or not, never both.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from bridge.errors import Conflict, NotFound
from bridge.queue import Attempt, DeliveryRecord, JobRecord, Page, Reconvert
from bridge.queue._records import (
    DELIVERY_COLUMNS,
    JOB_COLUMNS,
    build_records,
    delivery_filters,
)
from bridge.queue._sqlite_rows import insert_jobs, promote, refresh_delivery
from bridge.states import ACTIVE, FINISHED, JobState, check

_DELIVERIES = "deliveries JOIN delivery_data ON delivery_id = id"
_JOBS = "jobs JOIN job_bodies ON job_id = id"


def records(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> list[DeliveryRecord]:
    """Delivery rows (``DELIVERY_COLUMNS``) with their jobs, read in one more query."""
    if not rows:
        return []
    ids = [row[0] for row in rows]
    marks = ", ".join("?" * len(ids))
    job_rows = conn.execute(
        f"SELECT {JOB_COLUMNS} FROM {_JOBS} WHERE delivery_id IN ({marks}) ORDER BY number", ids
    )
    return build_records(rows, job_rows)


def by_guid(conn: sqlite3.Connection, guid: str) -> DeliveryRecord | None:
    rows = conn.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM {_DELIVERIES} WHERE guid = ?", (guid,)
    ).fetchall()
    found = records(conn, rows)
    return found[0] if found else None


def build(conn: sqlite3.Connection, repo: str, number: int) -> DeliveryRecord:
    rows = conn.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM {_DELIVERIES} WHERE repo_key = ? AND number = ?",
        (repo.lower(), number),
    ).fetchall()
    if not rows:
        raise NotFound(f"{repo} has no build {number}")
    return records(conn, rows)[0]


def builds(
    conn: sqlite3.Connection, repo: str, status: str | None, page: Page
) -> list[DeliveryRecord]:
    key = repo.lower()
    # Not the repos table: its counter outlives the deliveries that retention deletes.
    stored = "SELECT 1 FROM deliveries WHERE repo_key = ? LIMIT 1"
    if conn.execute(stored, (key,)).fetchone() is None:
        raise NotFound(f"no delivery for {repo} is stored")
    where, args = "repo_key = ?", [key]
    if status is not None:
        where, args = where + " AND status = ?", [*args, status]
    rows = conn.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM {_DELIVERIES} WHERE {where}"
        " ORDER BY number DESC LIMIT ? OFFSET ?",
        (*args, page.per_page, (page.page - 1) * page.per_page),
    ).fetchall()
    return records(conn, rows)


def deliveries(
    conn: sqlite3.Connection, guid: str | None, status: str | None, event: str | None, page: Page
) -> list[DeliveryRecord]:
    filters = delivery_filters(guid, status, event)
    clauses, args = [f"{column} = ?" for column, _ in filters], [value for _, value in filters]
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    rows = conn.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM {_DELIVERIES}{where} ORDER BY id DESC LIMIT ? OFFSET ?",
        (*args, page.per_page, (page.page - 1) * page.per_page),
    ).fetchall()
    return records(conn, rows)


def restart(
    conn: sqlite3.Connection, repo: str, number: int, reconvert: Reconvert, now: float
) -> DeliveryRecord:
    delivery = build(conn, repo, number)
    if any(job.state == JobState.RUNNING for job in delivery.jobs):
        raise Conflict("a job of this delivery is in flight; restart it once its attempt settles")
    if not delivery.has_payload or not all(job.has_body for job in delivery.jobs):
        raise Conflict("its payload was deleted by queue.retention_days; it cannot be restarted")
    if not delivery.jobs:
        payload = conn.execute(
            "SELECT payload FROM delivery_data WHERE delivery_id = ?", (delivery.id,)
        ).fetchone()[0]
        converted = reconvert(delivery.github_event, payload)
        if isinstance(converted, str):
            raise Conflict(f"nothing to forward: {converted}")
        event = conn.execute(
            "SELECT event FROM deliveries WHERE id = ?", (delivery.id,)
        ).fetchone()[0]
        insert_jobs(
            conn, [(delivery.id, i, new_job, now) for i, new_job in enumerate(converted, start=1)]
        )
        if not event:
            conn.execute(
                "UPDATE deliveries SET event = ? WHERE id = ?",
                (orjson.loads(converted[0].body).get("event", ""), delivery.id),
            )
    for job in delivery.jobs:
        if job.state not in ACTIVE:
            check(job.state, JobState.PENDING)
        lane = conn.execute("SELECT lane FROM jobs WHERE id = ?", (job.id,)).fetchone()[0]
        conn.execute(
            "UPDATE jobs SET state = 'pending', attempts = 0, first_attempt_at = NULL,"
            " next_attempt_at = ?, unclear = 0, error = '', exit_code = 0, vela_number = NULL,"
            " vela_link = '', enqueued_at = ?, started_at = NULL, finished_at = NULL,"
            " head = CASE WHEN head = 1 THEN 1 ELSE NOT EXISTS (SELECT 1 FROM jobs o"
            " WHERE o.lane = ? AND o.id <> ? AND o.state IN ('pending', 'running', 'retrying'))"
            " END WHERE id = ?",
            (now, now, lane, job.id, job.id),
        )
    conn.execute(
        "UPDATE deliveries SET enqueued_at = ?, started_at = NULL, finished_at = NULL WHERE id = ?",
        (now, delivery.id),
    )
    refresh_delivery(conn, delivery.id, now)
    return build(conn, repo, number)


def cancel(
    conn: sqlite3.Connection, repo: str, number: int, job: int, now: float
) -> DeliveryRecord:
    delivery = build(conn, repo, number)
    found = [j for j in delivery.jobs if j.number == job]
    if not found:
        raise NotFound(f"build {number} of {repo} has no job {job}")
    target = found[0]
    if target.state == JobState.RUNNING:
        raise Conflict("the job is in flight right now; cancel it again once its attempt settles")
    if target.state in FINISHED:
        raise Conflict(f"the job already finished ({target.state})")
    check(target.state, JobState.KILLED)
    row = conn.execute(
        "UPDATE jobs SET state = 'killed', error = 'cancelled by an operator', finished_at = ?"
        " WHERE id = ? RETURNING head, lane",
        (now, target.id),
    ).fetchone()
    if row[0]:
        promote(conn, target.id, row[1])
    refresh_delivery(conn, delivery.id, now)
    return build(conn, repo, number)


def job_log(
    conn: sqlite3.Connection, repo: str, number: int, job: int
) -> tuple[JobRecord, list[Attempt]]:
    delivery = build(conn, repo, number)
    found = [j for j in delivery.jobs if j.number == job]
    if not found:
        raise NotFound(f"build {number} of {repo} has no job {job}")
    attempts = [
        Attempt(started_at=a[0], duration=a[1], http_status=a[2], error=a[3], excerpt=a[4])
        for a in conn.execute(
            "SELECT started_at, duration, http_status, error, excerpt FROM attempts"
            " WHERE job_id = ? ORDER BY id",
            (found[0].id,),
        )
    ]
    return found[0], attempts
