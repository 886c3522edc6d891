"""The PostgreSQL queue's transactions for intake and workers: add, settle, purge.

Each function runs inside one transaction that :class:`~.postgres.PostgresQueue`
opens (in pipeline mode for add and settle: statements go out without waiting,
and a fetch waits for everything sent so far). Lock order: see
:mod:`._postgres_rows`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.queue import Added, Attempt, NewDelivery, Settlement
from bridge.queue._postgres_history import clean, clean_job
from bridge.queue._postgres_rows import (
    Conn,
    busy_lanes,
    insert_jobs,
    key32,
    lane_lock,
    lock,
    promote,
    refresh,
)
from bridge.queue._postgres_schema import ACTIVE_SQL, NS_GUID
from bridge.states import FINISHED, IllegalTransition, JobState, check, delivery_status

log = logging.getLogger("bridge.queue")

PURGE_CHUNK = 5_000  # deliveries deleted per transaction
# Intake's bound on each of its statements (SET LOCAL: its transactions only; a purge or
# an operator's read may take longer). One slower than this could not be answered within
# GitHub's 10 s either: it is cancelled (query_canceled) and intake answers 503 now.
INTAKE_STATEMENT_TIMEOUT = "5s"


@dataclass(frozen=True, slots=True)
class SettleItem:
    job_id: int
    settlement: Settlement
    now: float
    token: int | None  # the claim it ends; None: no claim known, nothing to check
    lane: str | None  # the job's lane when the claim is this queue's live one


async def add_many(conn: Conn, batch: Sequence[NewDelivery]) -> list[Added]:
    ds = [cleaned(d) for d in batch]
    first: dict[str, int] = {}
    for index, d in enumerate(ds):
        first.setdefault(d.guid, index)
    # One round trip in pipeline mode: the bound, the locks, then what they protect.
    await conn.execute(f"SET LOCAL statement_timeout = '{INTAKE_STATEMENT_TIMEOUT}'")
    await lock(
        conn,
        [(NS_GUID, key32(guid)) for guid in first]
        + [lane_lock(job.lane) for d in ds for job in d.jobs],
    )
    found = await conn.execute(
        "SELECT guid FROM deliveries WHERE guid = ANY(%s::text[])", (list(first),)
    )
    busy = await busy_lanes(conn, (job.lane for d in ds for job in d.jobs))
    stored = {row[0] for row in await found.fetchall()}
    taken = {row[0] for row in await busy.fetchall()}
    new = [i for i, d in enumerate(ds) if first[d.guid] == i and d.guid not in stored]
    counts = Counter(ds[i].repo.lower() for i in new if ds[i].repo)
    next_number: dict[str, int] = {}
    if counts:
        keys = sorted(counts)
        cur = await conn.execute(
            "INSERT INTO repos (key, last_number)"
            " SELECT k, n FROM unnest(%s::text[], %s::int8[]) AS t (k, n)"
            " ON CONFLICT (key) DO UPDATE"
            " SET last_number = repos.last_number + excluded.last_number"
            " RETURNING key, last_number",
            (keys, [counts[k] for k in keys]),
        )
        next_number = {key: last - counts[key] + 1 for key, last in await cur.fetchall()}
    numbers: list[int | None] = []
    for i in new:
        key = ds[i].repo.lower()
        numbers.append(next_number[key] if key else None)
        if key:
            next_number[key] += 1
    if new:
        rows = [ds[i] for i in new]
        await conn.execute(
            "INSERT INTO deliveries (guid, repo, repo_key, number, github_event, action, event,"
            " status, error, summary, payload, created_at, enqueued_at, finished_at)"
            " SELECT g, r, k, n, ge, a, e, s, x, sm, p, t, t, CASE WHEN s = 'skipped' THEN t END"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::int8[], %s::text[], %s::text[],"
            " %s::text[], %s::text[], %s::text[], %s::bytea[], %s::bytea[], %s::float8[])"
            " WITH ORDINALITY AS u (g, r, k, n, ge, a, e, s, x, sm, p, t, i) ORDER BY i",
            (
                [d.guid for d in rows],
                [d.repo for d in rows],
                [d.repo.lower() for d in rows],
                numbers,
                [d.github_event for d in rows],
                [d.action for d in rows],
                [d.event for d in rows],
                [str(delivery_status([JobState.PENDING] * len(d.jobs))) for d in rows],
                [d.skip or "" for d in rows],
                [orjson.dumps(d.summary) for d in rows],
                [d.payload for d in rows],
                [d.received_at for d in rows],
            ),
        )
        await insert_jobs(
            conn,
            [(d.guid, n, job, d.received_at) for d in rows for n, job in enumerate(d.jobs, 1)],
            taken,
        )
    added = set(new)
    return [
        (Added.SKIPPED if not d.jobs else Added.QUEUED) if i in added else Added.DUPLICATE
        for i, d in enumerate(ds)
    ]


async def add_one(delivery: NewDelivery, conn: Conn) -> list[Added]:
    return await add_many(conn, [delivery])


def cleaned(d: NewDelivery) -> NewDelivery:
    """The delivery with text PostgreSQL can store (no NUL; SQLite stored those as given)."""
    texts = (d.guid, d.github_event, d.action, d.repo, d.event, d.skip or "")
    jobs = tuple(clean_job(j) for j in d.jobs)
    if all(clean(t) == t for t in texts) and jobs == d.jobs:
        return d
    return NewDelivery(
        guid=clean(d.guid),
        github_event=clean(d.github_event),
        action=clean(d.action),
        repo=clean(d.repo),
        event=clean(d.event),
        summary=d.summary,
        payload=d.payload,
        skip=None if d.skip is None else clean(d.skip),
        jobs=jobs,
        received_at=d.received_at,
    )


async def settle_many(conn: Conn, batch: Sequence[SettleItem]) -> list[Exception | bool]:
    """Each item's outcome recorded (True), or not: superseded or purged (False), or an
    IllegalTransition."""
    lanes = {s.job_id: s.lane for s in batch if s.lane is not None}
    unknown = [s.job_id for s in batch if s.lane is None]
    if unknown:
        cur = await conn.execute("SELECT id, lane FROM jobs WHERE id = ANY(%s::int8[])", (unknown,))
        lanes.update({row[0]: row[1] for row in await cur.fetchall()})
    await lock(conn, [lane_lock(lane) for lane in lanes.values()])
    cur = await conn.execute(
        "SELECT id, state, delivery_id, lane, head, claim_token, org || '/' || repo FROM jobs"
        " WHERE id = ANY(%s::int8[]) ORDER BY id FOR NO KEY UPDATE",
        (sorted({s.job_id for s in batch}),),
    )
    jobs = {row[0]: list(row[1:]) for row in await cur.fetchall()}
    results: list[Exception | bool] = []
    updates: list[tuple[Any, ...]] = []
    attempts: list[tuple[int, Attempt]] = []
    finished_lanes: set[str] = set()
    settled: set[int] = set()  # their deliveries
    deployments: list[tuple[str, int, float]] = []
    for item in batch:
        row, s, a = jobs.get(item.job_id), item.settlement, item.settlement.attempt
        if row is None:  # purged meanwhile
            results.append(False)
            continue
        state, delivery_id, lane, head, token = JobState(row[0]), row[1], row[2], row[3], row[4]
        if item.token is not None and token != item.token:
            log.warning("job %d: its lease expired and was retaken; outcome %s not recorded",
                        item.job_id, s.state)  # fmt: skip
            if a is not None:
                attempts.append((item.job_id, a))
            results.append(False)
            continue
        try:
            check(state, s.state)
        except IllegalTransition as exc:
            results.append(exc)
            continue
        finished = s.state in FINISHED
        updates.append((
            s.state, int(s.consumed), s.paused, a.started_at if a and s.consumed else None,
            s.next_attempt_at or item.now,
            s.unclear, a.http_status if a else None, clean(s.error), s.vela_number,
            clean(s.vela_link),
            item.now if finished else None, not finished, item.job_id,
        ))  # fmt: skip
        if a is not None:
            attempts.append((item.job_id, a))
        if s.vela_deployment is not None:
            deployments.append((row[5].lower(), s.vela_deployment, item.now))
        if finished and head:
            finished_lanes.add(lane)
        row[0], row[3], row[4] = s.state, head and not finished, None
        settled.add(delivery_id)
        results.append(True)
    if updates:
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE jobs SET state = %s, attempts = attempts + %s, lease_until = NULL,"
                " claim_token = NULL, first_attempt_at = COALESCE(first_attempt_at + %s, %s),"
                " next_attempt_at = %s, unclear = %s, exit_code = COALESCE(%s, exit_code),"
                " error = %s, vela_number = COALESCE(%s, vela_number), vela_link = %s,"
                " finished_at = %s, head = head AND %s WHERE id = %s",
                updates,
            )
    if attempts:
        await conn.execute(
            "INSERT INTO attempts (job_id, started_at, duration, http_status, error, excerpt)"
            " SELECT * FROM unnest(%s::int8[], %s::float8[], %s::float8[], %s::int4[],"
            " %s::text[], %s::text[])",
            (
                [j for j, _ in attempts],
                [a.started_at for _, a in attempts],
                [a.duration for _, a in attempts],
                [a.http_status for _, a in attempts],
                [clean(a.error) for _, a in attempts],
                [clean(a.excerpt) for _, a in attempts],
            ),
        )
    if deployments:
        deployments.sort()  # row locks in key order
        await conn.execute(
            "INSERT INTO vela_deployments (repo_key, number, created_at)"
            " SELECT * FROM unnest(%s::text[], %s::int8[], %s::float8[]) ON CONFLICT DO NOTHING",
            tuple(list(column) for column in zip(*deployments, strict=True)),
        )
    await promote(conn, finished_lanes)
    await refresh(conn, settled, max(item.now for item in batch))
    return results


async def purge_bodies(conn: Conn, before: float) -> int:
    """Finished deliveries' payloads and their jobs' bodies go after queue.retention_days."""
    cur = await conn.execute(
        "UPDATE deliveries SET payload = NULL WHERE finished_at < %s AND payload IS NOT NULL",
        (before,),
    )
    touched = max(cur.rowcount, 0)
    await conn.execute(
        "UPDATE jobs SET body = NULL, fallback = NULL FROM deliveries d"
        " WHERE jobs.delivery_id = d.id AND jobs.body IS NOT NULL"
        " AND d.finished_at < %s AND d.payload IS NULL"
        f" AND jobs.state NOT IN {ACTIVE_SQL}",
        (before,),
    )
    return touched


async def purge_rows(conn: Conn, before: float) -> int:
    """Whole finished deliveries once their GUIDs are no longer needed for dedupe."""
    cur = await conn.execute(
        "SELECT id FROM deliveries WHERE finished_at < %s ORDER BY id LIMIT %s"
        " FOR UPDATE SKIP LOCKED",
        (before, PURGE_CHUNK),
    )
    ids = [row[0] for row in await cur.fetchall()]
    if not ids:
        return 0
    await conn.execute(
        "DELETE FROM attempts WHERE job_id IN"
        " (SELECT id FROM jobs WHERE delivery_id = ANY(%s::int8[]))",
        (ids,),
    )
    await conn.execute("DELETE FROM jobs WHERE delivery_id = ANY(%s::int8[])", (ids,))
    cur = await conn.execute("DELETE FROM deliveries WHERE id = ANY(%s::int8[])", (ids,))
    return max(cur.rowcount, 0)


async def purge_other(conn: Conn, before: float) -> None:
    # Vela knows its deployments too (GET …/deployments/{id}): the record is a shortcut.
    await conn.execute("DELETE FROM vela_deployments WHERE created_at < %s", (before,))
    # Commit-status bookkeeping of deliveries that retention has deleted.
    await conn.execute(
        "DELETE FROM reports r WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.guid = r.guid)"
    )
