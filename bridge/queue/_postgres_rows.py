"""Row-level steps shared by the PostgreSQL queue's worker side and operator side.

Lock order, in every transaction (so that replicas never deadlock one another):
advisory locks first, all in one statement in ascending (namespace, key) order;
then job rows; then delivery rows, in ascending id (:func:`refresh`, always last).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from bridge.queue import NewJob
from bridge.queue._postgres_schema import ACTIVE_SQL, NS_LANE
from bridge.states import ACTIVE, JobState, delivery_error, delivery_status

Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]


def key32(text: str) -> int:
    """A stable signed 32-bit hash, the same in every replica (unlike ``hash()``)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=4).digest(), "big", signed=True
    )


def lane_lock(lane: str) -> tuple[int, int]:
    return (NS_LANE, key32(lane))


async def lock(conn: Conn, keys: Iterable[tuple[int, int]]) -> None:
    """Take transaction-scoped advisory locks in ascending order (see the module's doc)."""
    ordered = sorted(set(keys))
    if ordered:
        await conn.execute(
            "SELECT count(pg_advisory_xact_lock(ns, k))"
            " FROM unnest(%s::int4[], %s::int4[]) AS t (ns, k)",
            ([ns for ns, _ in ordered], [k for _, k in ordered]),
        )


async def busy_lanes(conn: Conn, lanes: Iterable[str]) -> Cursor:
    """Which of ``lanes`` have an active job (fetch the cursor: one lane per row)."""
    return await conn.execute(
        "SELECT l FROM unnest(%s::text[]) AS l WHERE EXISTS"
        f" (SELECT 1 FROM jobs WHERE lane = l AND state IN {ACTIVE_SQL})",
        (sorted(set(lanes)),),
    )


async def insert_jobs(
    conn: Conn,
    rows: Sequence[tuple[int | str, int, NewJob, float]],
    taken: set[str] | None = None,
) -> None:
    """New pending jobs ``(delivery, number, job, enqueued_at)`` in order; hold lane locks.

    ``delivery`` is the delivery's id, or its GUID (a delivery inserted in this
    transaction, looked up here: no round trip to learn its id). A job heads its lane
    when no other job of the lane is active (``taken``: those lanes, when known): the
    lane locks make that check and the insert atomic across replicas.
    """
    if not rows:
        return
    if taken is None:
        cur = await busy_lanes(conn, (job.lane for _, _, job, _ in rows))
        taken = {r[0] for r in await cur.fetchall()}
    taken = set(taken)
    heads = []
    for _, _, job, _ in rows:
        heads.append(job.lane not in taken)
        taken.add(job.lane)
    by_guid = isinstance(rows[0][0], str)
    await conn.execute(
        "INSERT INTO jobs (delivery_id, number, state, endpoint, org, repo, path, body, fallback,"
        " lane, head, next_attempt_at, enqueued_at) SELECT "
        + ("(SELECT id FROM deliveries WHERE guid = d)" if by_guid else "d::int8")
        + ", n, 'pending', e, o, r, p, b, f, l, h, t, t FROM unnest("
        "%s::text[], %s::int4[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[],"
        " %s::bytea[], %s::text[], %s::bool[], %s::float8[]) WITH ORDINALITY"
        " AS u (d, n, e, o, r, p, b, f, l, h, t, i) ORDER BY i",
        (
            [str(d) for d, _, _, _ in rows],
            [n for _, n, _, _ in rows],
            [j.endpoint for _, _, j, _ in rows],
            [j.org for _, _, j, _ in rows],
            [j.repo for _, _, j, _ in rows],
            [j.path for _, _, j, _ in rows],
            [j.body for _, _, j, _ in rows],
            [j.fallback for _, _, j, _ in rows],
            [j.lane for _, _, j, _ in rows],
            heads,
            [t for _, _, _, t in rows],
        ),
    )


async def promote(conn: Conn, lanes: Iterable[str]) -> None:
    """Their heads left the active states: each lane's oldest active job becomes its head.

    The finished jobs' ``head`` must already be false; the lanes' locks must be held.
    """
    ordered = sorted(set(lanes))
    if ordered:
        await conn.execute(
            "UPDATE jobs SET head = true WHERE NOT head AND id IN (SELECT (SELECT id FROM jobs"
            f" WHERE lane = l AND state IN {ACTIVE_SQL} ORDER BY id LIMIT 1)"
            " FROM unnest(%s::text[]) AS l)",
            (ordered,),
        )


async def refresh(conn: Conn, deliveries: Iterable[int], now: float) -> None:
    """Derive the deliveries' status, error and times from their jobs.

    The delivery rows are locked first (ascending id), so that two replicas settling
    two jobs of one delivery at once cannot both derive the status from a stale view:
    the second waits, then reads the first one's committed job states.
    """
    ids = sorted(set(deliveries))
    if not ids:
        return
    await conn.execute(
        "SELECT id FROM deliveries WHERE id = ANY(%s::int8[]) ORDER BY id FOR NO KEY UPDATE",
        (ids,),
    )
    cur = await conn.execute(
        "SELECT delivery_id, state, error FROM jobs WHERE delivery_id = ANY(%s::int8[])"
        " ORDER BY delivery_id, number",
        (ids,),
    )
    jobs: dict[int, list[tuple[JobState, str]]] = defaultdict(list)
    for delivery_id, state, error in await cur.fetchall():
        jobs[delivery_id].append((JobState(state), error))
    statuses, errors, running, done = [], [], [], []
    for i in ids:
        found = [state for state, _ in jobs[i]]
        statuses.append(str(delivery_status(found)))
        errors.append(delivery_error(jobs[i]))
        running.append(JobState.RUNNING in found)
        done.append(not (set(found) & ACTIVE))
    await conn.execute(
        "UPDATE deliveries d SET status = u.status, error = COALESCE(u.error, d.error),"
        " started_at = CASE WHEN u.running THEN COALESCE(d.started_at, %s) ELSE d.started_at END,"
        " finished_at = CASE WHEN u.done THEN %s::float8 END"
        " FROM unnest(%s::int8[], %s::text[], %s::text[], %s::bool[], %s::bool[])"
        " AS u (id, status, error, running, done) WHERE d.id = u.id",
        (now, now, ids, statuses, errors, running, done),
    )
