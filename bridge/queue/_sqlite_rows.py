"""Row-level steps shared by the SQLite queue's worker side and operator side."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from bridge.queue import NewJob
from bridge.states import ACTIVE, JobState, delivery_error, delivery_status

ACTIVE_SQL = "('pending', 'running', 'retrying')"


def insert_jobs(conn: sqlite3.Connection, new: Sequence[tuple[int, int, NewJob, float]]) -> None:
    """New pending jobs, each ``(delivery id, number in its delivery, job, enqueued at)``,
    in order, with one statement per table. A job heads its lane when no job of the lane
    is active before it. Ids are assigned as SQLite would (the largest plus one): the
    writer's transaction is the only one."""
    if not new:
        return
    active = _active_lanes(conn, {job.lane for _, _, job, _ in new})
    job_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0]
    rows, bodies = [], []
    for delivery_id, number, job, at in new:
        job_id += 1
        head = job.lane not in active
        active.add(job.lane)
        rows.append(
            (
                job_id, delivery_id, number, job.endpoint, job.org, job.repo, job.path,
                job.lane, int(head), at, at,
            )
        )  # fmt: skip
        bodies.append((job_id, job.body, job.fallback))
    conn.executemany(
        "INSERT INTO jobs (id, delivery_id, number, state, endpoint, org, repo, path,"
        " lane, head, next_attempt_at, enqueued_at)"
        " VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.executemany("INSERT INTO job_bodies (job_id, body, fallback) VALUES (?, ?, ?)", bodies)


def _active_lanes(conn: sqlite3.Connection, lanes: set[str]) -> set[str]:
    """The lanes among ``lanes`` that already have an active job (and so a head)."""
    if not lanes:
        return set()
    # One probe of the jobs_lane index per lane (EXISTS stops at the first active job).
    values = ", ".join(["(?)"] * len(lanes))
    return {
        r[0]
        for r in conn.execute(
            f"WITH wanted (lane) AS (VALUES {values}) SELECT lane FROM wanted"
            f" WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.lane = wanted.lane"
            f" AND j.state IN {ACTIVE_SQL})",
            list(lanes),
        )
    }


def promote(conn: sqlite3.Connection, job_id: int, lane: str) -> None:
    """The job left the active states: the next active job of its lane becomes the head."""
    conn.execute("UPDATE jobs SET head = 0 WHERE id = ?", (job_id,))
    conn.execute(
        "UPDATE jobs SET head = 1 WHERE id = (SELECT id FROM jobs"
        f" WHERE lane = ? AND state IN {ACTIVE_SQL} ORDER BY id LIMIT 1)",
        (lane,),
    )


def refresh_delivery(conn: sqlite3.Connection, delivery_id: int, now: float) -> None:
    """Derive the delivery's status, error and times from its jobs."""
    jobs = [
        (JobState(r[0]), r[1])
        for r in conn.execute(
            "SELECT state, error FROM jobs WHERE delivery_id = ? ORDER BY number", (delivery_id,)
        )
    ]
    states = [state for state, _ in jobs]
    done = not (set(states) & ACTIVE)
    conn.execute(
        "UPDATE deliveries SET status = ?, error = COALESCE(?, error),"
        " started_at = CASE WHEN ? THEN COALESCE(started_at, ?) ELSE started_at END,"
        " finished_at = ? WHERE id = ?",
        (
            delivery_status(states),
            delivery_error(jobs),
            int(JobState.RUNNING in states),
            now,
            now if done else None,
            delivery_id,
        ),
    )
