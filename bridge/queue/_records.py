"""Rows → records, shared by both queue implementations.

Both select their columns in this order (``DELIVERY_COLUMNS`` / ``JOB_COLUMNS``
name them; each implementation's SQL supplies them from its own tables).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from bridge.queue import DeliveryRecord, JobRecord
from bridge.states import JobState

DELIVERY_COLUMNS = (
    "id, guid, repo, number, github_event, action, event, status, error, summary,"
    " payload IS NOT NULL, created_at, enqueued_at, started_at, finished_at"
)
JOB_COLUMNS = (
    "id, number, state, endpoint, path, body IS NOT NULL, attempts, next_attempt_at, unclear,"
    " exit_code, error, vela_number, vela_link, enqueued_at, started_at, finished_at, delivery_id"
)


def build_records(
    rows: Sequence[Sequence[Any]], job_rows: Iterable[Sequence[Any]]
) -> list[DeliveryRecord]:
    """Delivery rows (DELIVERY_COLUMNS) with their jobs' rows (JOB_COLUMNS, by number)."""
    jobs: dict[int, list[JobRecord]] = {row[0]: [] for row in rows}
    for j in job_rows:
        jobs[j[16]].append(
            JobRecord(
                id=j[0], number=j[1], state=JobState(j[2]), endpoint=j[3], path=j[4],
                has_body=bool(j[5]), attempts=j[6], next_attempt_at=j[7], unclear=bool(j[8]),
                exit_code=j[9], error=j[10], vela_number=j[11], vela_link=j[12],
                enqueued_at=j[13], started_at=j[14], finished_at=j[15],
            )
        )  # fmt: skip
    return [
        DeliveryRecord(
            id=r[0], guid=r[1], repo=r[2], number=r[3], github_event=r[4], action=r[5],
            event=r[6], status=r[7], error=r[8], summary=orjson.loads(r[9]),
            has_payload=bool(r[10]), created_at=r[11], enqueued_at=r[12], started_at=r[13],
            finished_at=r[14], jobs=tuple(jobs[r[0]]),
        )
        for r in rows
    ]  # fmt: skip


def delivery_filters(
    guid: str | None, status: str | None, event: str | None
) -> list[tuple[str, str]]:
    """The ``(column, value)`` pairs the deliveries listing must match. ``event`` is the
    GitHub event (``pull_request``, every action) or, as the build object's
    ``github_event`` shows it, with its action (``pull_request.synchronize``)."""
    pairs = [("guid", guid), ("status", status)]
    if event is not None:
        name, dot, action = event.partition(".")
        pairs += [("github_event", name)] + ([("action", action)] if dot else [])
    return [(column, value) for column, value in pairs if value is not None]
