"""The durable queue: what intake stores, workers claim and settle, operators read.

One protocol, :class:`Queue`; :func:`open_queue` picks the implementation from
``queue.url``. Records crossing the boundary are frozen dataclasses; the rest
of the bridge never sees SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from bridge.states import JobState


@dataclass(frozen=True, slots=True)
class NewJob:
    endpoint: str  # "builds" or "deployments"
    org: str
    repo: str
    path: str
    body: bytes  # the JSON request body, serialised once at intake
    lane: str  # forwarding order: jobs of one lane go one at a time, oldest first
    fallback: bytes | None = None  # deployments: the build body if Vela made the deployment


@dataclass(frozen=True, slots=True)
class NewDelivery:
    guid: str
    github_event: str
    action: str
    repo: str  # "owner/name", "" when the payload has no repository
    event: str  # the Vela event, "" when skipped before conversion
    summary: Any  # the operator API's build fields: bridge.convert.Summary, or a Mapping
    payload: bytes  # the GitHub payload as JSON, for restarts
    skip: str | None  # why nothing is forwarded; None when jobs are queued
    jobs: tuple[NewJob, ...]
    received_at: float


class Added(StrEnum):
    QUEUED = "queued"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: int
    guid: str
    number: int
    endpoint: str
    org: str
    repo: str
    path: str
    body: bytes
    attempts: int  # attempts consumed so far
    first_attempt_at: float | None
    unclear: bool  # an earlier attempt may have reached Vela: look before re-sending
    github_event: str
    action: str
    fallback: bytes | None = None
    # Which claim this is: settle() takes it back, so that an attempt whose lease ran out
    # and was taken again cannot record its outcome over the new claim's.
    claim: int | None = None
    # When this run of the job (since it was queued or restarted) was first claimed:
    # nothing an earlier attempt of the run sent to Vela is older.
    first_claimed_at: float | None = None
    # When the job's latest logged attempt ended: the time paused since then is not part
    # of its age (Settlement.paused).
    last_attempt_at: float | None = None
    # The job's latest error: a job already past retry.max_age_seconds when it is claimed
    # fails with it, unsent.
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One line of a job's log."""

    started_at: float
    duration: float
    http_status: int | None
    error: str
    excerpt: str


@dataclass(frozen=True, slots=True)
class Settlement:
    state: JobState  # SUCCESS, SKIPPED, FAILURE or RETRYING
    # None when nothing was sent: the build was found in Vela, or the job was past its age
    attempt: Attempt | None
    consumed: bool = True  # whether this attempt counts against retry.max_attempts
    # Seconds since the job's previous attempt that forwarding was paused on a refused
    # token: first_attempt_at moves forward by them, so retry.max_age does not count them.
    paused: float = 0.0
    next_attempt_at: float = 0.0
    error: str = ""
    unclear: bool = False
    vela_number: int | None = None
    vela_link: str = ""
    vela_deployment: int | None = None  # a GitHub deployment Vela made: its echo is a build


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    number: int
    state: JobState
    endpoint: str
    path: str
    has_body: bool
    attempts: int
    next_attempt_at: float
    unclear: bool
    exit_code: int
    error: str
    vela_number: int | None
    vela_link: str
    enqueued_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    id: int
    guid: str
    repo: str
    number: int | None
    github_event: str
    action: str
    event: str
    status: str
    error: str
    summary: Mapping[str, Any]
    has_payload: bool
    created_at: float
    enqueued_at: float
    started_at: float | None
    finished_at: float | None
    jobs: tuple[JobRecord, ...]


@dataclass(frozen=True, slots=True)
class Page:
    """Which slice of a newest-first listing; ``page`` counts from 1."""

    page: int = 1
    per_page: int = 25


# Restarting a delivery the bridge skipped converts its payload again, ignoring the
# skip reason: (github_event, payload JSON) → the jobs, or why there still are none.
Reconvert = Callable[[str, bytes], "tuple[NewJob, ...] | str"]


class Queue(Protocol):
    """What the bridge needs of a durable queue; every method is safe to call concurrently."""

    async def add(self, delivery: NewDelivery) -> Added:
        """Store durably (committed and synced) before returning; dedupe on the GUID."""

    async def claim(self, limit: int, now: float) -> list[ClaimedJob]:
        """Lease up to ``limit`` due jobs, each the oldest active job of its lane."""

    async def settle(
        self, job_id: int, settlement: Settlement, now: float, claim: int | None = None
    ) -> bool:
        """Record the outcome of a claimed job's attempt and end the claim; True if so.

        ``claim`` is the ClaimedJob's: when that lease ran out and the job was claimed
        again, here or by another replica, the outcome changes nothing but the attempts
        log, and settle returns False (as for a job purged meanwhile). None means this
        queue's latest claim of the job."""

    async def release(self, job_ids: Sequence[int], now: float) -> None:
        """End claims unfinished (shutdown): the jobs retry at once, looking up Vela first."""

    async def next_due(self) -> float | None:
        """When the earliest claimable job becomes due, or None when there is none."""

    async def delivery(self, guid: str) -> DeliveryRecord | None: ...

    async def build(self, repo: str, number: int) -> DeliveryRecord:
        """A repository's delivery by number (repo matched case-insensitively); NotFound."""

    async def builds(self, repo: str, status: str | None, page: Page) -> list[DeliveryRecord]:
        """A repository's deliveries, newest first; NotFound when it has none at all."""

    async def deliveries(
        self, guid: str | None, status: str | None, event: str | None, page: Page
    ) -> list[DeliveryRecord]:
        """Every delivery (with or without a repository), newest first."""

    async def restart(
        self, repo: str, number: int, reconvert: Reconvert, now: float
    ) -> DeliveryRecord:
        """Queue all the delivery's jobs again; Conflict while one is in flight."""

    async def cancel(self, repo: str, number: int, job: int, now: float) -> DeliveryRecord:
        """A pending or retrying job becomes killed; Conflict when running or finished."""

    async def job_log(self, repo: str, number: int, job: int) -> tuple[JobRecord, list[Attempt]]:
        """A job and its attempts, oldest first; NotFound."""

    async def is_vela_deployment(self, repo: str, number: int) -> bool:
        """Whether a settled deployment request recorded GitHub deployment ``number``."""

    async def payload(self, guid: str) -> bytes | None:
        """The stored GitHub payload (None when unknown or deleted by retention)."""

    async def report_state(self, guid: str, state: str) -> bool:
        """Record ``state`` as the last commit status reported for the delivery.

        True when it differs from the one recorded before (the caller then reports
        it); False when it was already reported, so one state change gives one status.
        """

    async def try_lead(self, name: str, holder: str, ttl: float, now: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` until ``now + ttl``.

        True when ``holder`` has it: one replica at a time runs the job named.
        """

    async def stats(self, now: float) -> tuple[int, float]:
        """Jobs not yet finished, and the age in seconds of the oldest (0 when none)."""

    async def ping(self) -> None:
        """Raise QueueUnavailable unless the queue takes a write right now (/readyz): it
        fails when intake would, not only when the queue cannot be reached."""

    async def purge(self, now: float) -> int:
        """Apply queue.retention_days; the number of deliveries touched."""

    async def close(self) -> None: ...


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def preflight(url: str) -> None:
    """Fail fast with a clear QueueError when the queue is certain not to open.

    SQLite: takes the file's one-process lock, which open_queue then takes over."""
    if url.startswith("sqlite:///"):
        from bridge.queue.sqlite import reserve

        reserve(_sqlite_path(url))
    elif _is_postgres(url):
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            from bridge.errors import QueueUnavailable

            raise QueueUnavailable(
                "queue.url is a PostgreSQL URL, but the PostgreSQL driver is not installed:"
                " pip install 'vela-bridge[postgres]'"
            ) from None


async def open_queue(url: str, *, lease_seconds: float, retention_days: float) -> Queue:
    if url.startswith("sqlite:///"):
        from bridge.queue.sqlite import SQLiteQueue

        return await SQLiteQueue.open(
            _sqlite_path(url),
            lease_seconds=lease_seconds,
            retention_days=retention_days,
        )
    if _is_postgres(url):
        preflight(url)
        from bridge.queue.postgres import PostgresQueue

        return await PostgresQueue.open(
            url, lease_seconds=lease_seconds, retention_days=retention_days
        )
    raise NotImplementedError(f"no queue implementation for {url.split(':', 1)[0]}: URLs")


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))
