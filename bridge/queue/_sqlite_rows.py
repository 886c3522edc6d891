"""Row-level steps shared by the SQLite queue's worker side and operator side."""

from __future__ import annotations

import sqlite3

from bridge.queue import NewJob
from bridge.states import ACTIVE, JobState, delivery_status

ACTIVE_SQL = "('pending', 'running', 'retrying')"


def insert_job(
    conn: sqlite3.Connection, delivery_id: int, number: int, job: NewJob, now: float
) -> None:
    """A new pending job; it heads its lane when no other job of the lane is active."""
    head = (
        conn.execute(
            f"SELECT 1 FROM jobs WHERE lane = ? AND state IN {ACTIVE_SQL} LIMIT 1", (job.lane,)
        ).fetchone()
        is None
    )
    job_id = conn.execute(
        "INSERT INTO jobs (delivery_id, number, state, endpoint, org, repo, path,"
        " lane, head, next_attempt_at, enqueued_at)"
        " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            delivery_id, number, job.endpoint, job.org, job.repo, job.path,
            job.lane, int(head), now, now,
        ),
    ).lastrowid  # fmt: skip
    conn.execute(
        "INSERT INTO job_bodies (job_id, body, fallback) VALUES (?, ?, ?)",
        (job_id, job.body, job.fallback),
    )


def promote(conn: sqlite3.Connection, job_id: int, lane: str) -> None:
    """The job left the active states: the next active job of its lane becomes the head."""
    conn.execute("UPDATE jobs SET head = 0 WHERE id = ?", (job_id,))
    conn.execute(
        "UPDATE jobs SET head = 1 WHERE id = (SELECT id FROM jobs"
        f" WHERE lane = ? AND state IN {ACTIVE_SQL} ORDER BY id LIMIT 1)",
        (lane,),
    )


def refresh_delivery(
    conn: sqlite3.Connection, delivery_id: int, now: float, error: str | None = None
) -> None:
    states = [
        JobState(r[0])
        for r in conn.execute("SELECT state FROM jobs WHERE delivery_id = ?", (delivery_id,))
    ]
    status = delivery_status(states)
    done = not (set(states) & ACTIVE)
    conn.execute(
        "UPDATE deliveries SET status = ?, error = COALESCE(?, error),"
        " started_at = CASE WHEN ? THEN COALESCE(started_at, ?) ELSE started_at END,"
        " finished_at = ? WHERE id = ?",
        (
            status,
            error,
            int(JobState.RUNNING in states),
            now,
            now if done else None,
            delivery_id,
        ),
    )
