"""The operator API (operator-api.md): every delivery's fate, restart and cancel.

Shaped like the Drone builds API of seed 004: a *build* is one stored delivery
of a repository, a *job* one Vela request made for it, a job's *log* its
attempt history. Every route wants ``Authorization: Bearer <operator.token>``;
with no token configured, every request is refused.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from bridge import observability as metrics
from bridge.config import Secret
from bridge.convert import Policy, convert, read_payload
from bridge.errors import IntakeError, NotFound, OperatorError, QueueError
from bridge.intake import JSONResponse, new_jobs
from bridge.queue import Attempt, DeliveryRecord, JobRecord, NewJob, Page, Queue
from bridge.states import DeliveryStatus, JobState

log = logging.getLogger("bridge.operator")

_MAX_PER_PAGE = 100
_MAX_PAGE = 1_000_000
_LARGEST = 2**63 - 1  # numbers are stored as 64-bit integers: anything larger is unknown
_STATUSES = frozenset(DeliveryStatus)

Handler = Callable[[Request], Awaitable[Response]]


class OperatorAPI:
    def __init__(
        self,
        queue: Callable[[], Queue],
        token: Secret | None,
        policy: Policy,
        vela_url: str,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._queue = queue
        self._token = token.value.encode() if token else None
        self._policy = policy
        self._vela_url = vela_url
        self._on_queued = on_queued

    def routes(self) -> list[Route]:
        repo = "/api/repos/{owner}/{name}"
        return [
            Route(f"{repo}/builds", self._guard(self.list_builds), methods=["GET"]),
            Route(f"{repo}/builds/{{number}}", self._guard(self.get_build), methods=["GET"]),
            Route(f"{repo}/builds/{{number}}", self._guard(self.restart), methods=["POST"]),
            Route(f"{repo}/logs/{{number}}/{{job}}", self._guard(self.log), methods=["GET"]),
            Route(f"{repo}/logs/{{number}}/{{job}}", self._guard(self.cancel), methods=["DELETE"]),
            Route("/api/deliveries", self._guard(self.list_deliveries), methods=["GET"]),
        ]

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not self._authorized(request.headers.get("authorization", "")):
                return JSONResponse({"error": "a valid operator token is required"}, 401)
            try:
                return await handler(request)
            except OperatorError as exc:
                return JSONResponse({"error": exc.message}, exc.status_code)
            except QueueError as exc:
                log.error("operator API: the queue cannot answer: %s", exc)
                return JSONResponse({"error": "the queue cannot be reached right now"}, 503)

        return guarded

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        if self._token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token)

    # -- routes -------------------------------------------------------------------------

    async def list_builds(self, request: Request) -> Response:
        status = _status(request)
        found = await self._queue().builds(_repo(request), status, _page(request))
        return JSONResponse([self._build(d) for d in found])

    async def list_deliveries(self, request: Request) -> Response:
        query = request.query_params
        found = await self._queue().deliveries(
            query.get("guid"), _status(request), query.get("event"), _page(request)
        )
        return JSONResponse([self._build(d) for d in found])

    async def get_build(self, request: Request) -> Response:
        found = await self._queue().build(_repo(request), _positive(request, "number"))
        return JSONResponse(self._build(found))

    async def restart(self, request: Request) -> Response:
        restarted = await self._queue().restart(
            _repo(request), _positive(request, "number"), self._reconvert, time.time()
        )
        self._on_queued()
        return JSONResponse(self._build(restarted))

    async def cancel(self, request: Request) -> Response:
        cancelled = await self._queue().cancel(
            _repo(request), _positive(request, "number"), _positive(request, "job"), time.time()
        )
        if cancelled.status == DeliveryStatus.KILLED:
            metrics.FINISHED.labels("killed").inc()
        self._on_queued()  # a cancelled head lets the next job of its lane go
        return JSONResponse(self._build(cancelled))

    async def log(self, request: Request) -> Response:
        job, attempts = await self._queue().job_log(
            _repo(request), _positive(request, "number"), _positive(request, "job")
        )
        return PlainTextResponse(_log_text(job, attempts))

    # -- helpers ------------------------------------------------------------------------

    def _reconvert(self, github_event: str, payload: bytes) -> tuple[NewJob, ...] | str:
        """An operator restart of a skipped delivery: convert again, ignoring the skip."""
        try:
            read = read_payload(github_event, payload)
            conversion = convert(github_event, read, self._policy, force=True)
        except IntakeError as exc:
            return exc.message
        return conversion.skip if conversion.skip is not None else new_jobs(conversion)

    def _build(self, d: DeliveryRecord) -> dict[str, Any]:
        """The build object of operator-api.md: every field always present."""
        s = d.summary
        vela = next((j for j in d.jobs if j.vela_number is not None), None)
        return {
            "id": d.id,
            "number": d.number or 0,
            "repo": d.repo,
            "delivery": d.guid,
            "github_event": f"{d.github_event}.{d.action}" if d.action else d.github_event,
            "event": d.event,
            "status": d.status,
            "error": d.error,
            "created_at": _seconds(d.created_at),
            "enqueued_at": _seconds(d.enqueued_at),
            "started_at": _seconds(d.started_at),
            "finished_at": _seconds(d.finished_at),
            "commit": s.get("commit", ""),
            "branch": s.get("branch", ""),
            "ref": s.get("ref", ""),
            "remote": s.get("remote", ""),
            "message": s.get("message", ""),
            "timestamp": s.get("timestamp", 0),
            "author": s.get("author", ""),
            "author_avatar": s.get("author_avatar", ""),
            "author_email": s.get("author_email", ""),
            "link_url": s.get("link_url", ""),
            "vela_build": (
                {"number": vela.vela_number, "link": vela.vela_link} if vela is not None else None
            ),
            "jobs": [
                {
                    "id": j.id,
                    "number": j.number,
                    "status": _job_status(j.state),
                    "enqueued_at": _seconds(j.enqueued_at),
                    "started_at": _seconds(j.started_at),
                    "finished_at": _seconds(j.finished_at),
                    "exit_code": j.exit_code,
                    "environment": {"VELA_URL": self._vela_url, "VELA_ENDPOINT": j.path},
                }
                for j in d.jobs
            ],
        }


def _job_status(state: JobState) -> str:
    """Jobs show the build statuses: a job waiting for its retry is ``running``."""
    return "running" if state == JobState.RETRYING else str(state)


def _seconds(value: float | None) -> int:
    return int(value) if value else 0


def _repo(request: Request) -> str:
    return f"{request.path_params['owner']}/{request.path_params['name']}"


def _positive(request: Request, name: str) -> int:
    number = _positive_int(request.path_params[name], name)
    if number > _LARGEST:
        raise NotFound(f"no {name} {number}")
    return number


def _positive_int(text: str, name: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 30 or int(text) < 1:
        raise OperatorError(f"{name} must be a positive integer")
    return int(text)


def _page(request: Request) -> Page:
    query = request.query_params
    page = _positive_int(query.get("page", "1"), "page")
    if page > _MAX_PAGE:
        raise OperatorError(f"page must be at most {_MAX_PAGE}")
    per_page = _positive_int(query.get("per_page", "25"), "per_page")
    if per_page > _MAX_PER_PAGE:
        raise OperatorError(f"per_page must be at most {_MAX_PER_PAGE}")
    return Page(page, per_page)


def _status(request: Request) -> str | None:
    status = request.query_params.get("status")
    if status is not None and status not in _STATUSES:
        raise OperatorError("status must be one of " + ", ".join(sorted(_STATUSES)))
    return status


def _when(value: float) -> str:
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _log_text(job: JobRecord, attempts: list[Attempt]) -> str:
    """One line per attempt, then what happens next (operator-api.md, logs)."""
    lines = []
    for number, a in enumerate(attempts, start=1):
        outcome = f"HTTP {a.http_status}" if a.http_status is not None else "no answer"
        line = f"{_when(a.started_at)}  attempt {number}  {a.duration * 1000:.0f} ms  {outcome}"
        if a.error:
            line += f"  {a.error}"
        if a.excerpt and a.excerpt not in a.error:
            line += f"  | {a.excerpt}"
        lines.append(line)
    if not attempts:
        lines.append("no attempt yet")
    if job.state == JobState.RETRYING:
        lines.append(f"next attempt at {_when(job.next_attempt_at)}")
    elif job.state == JobState.PENDING:
        lines.append("waiting to be sent")
    elif job.state == JobState.RUNNING:
        lines.append("in flight now")
    else:
        lines.append(f"finished: {job.state}" + (f" ({job.error})" if job.error else ""))
    return "\n".join(lines) + "\n"
