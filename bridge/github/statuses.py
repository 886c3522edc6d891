"""Failure reports (github.md "Failure reports"): a commit status when Vela never got a build.

After every settlement the forwarder calls :meth:`StatusReporter.on_settled`, which
returns at once; the rest runs in a background task, so reporting never holds up
forwarding. A delivery whose status becomes ``failure`` gets ``state = "error"`` on
its commit (context ``vela-bridge``, a description of at most 140 characters saying
why, no ``target_url``: the operator API is internal). When an operator restart
later gets it to Vela it gets ``state = "success"`` with Vela's build link. Skipped
and killed deliveries get nothing, and a success that followed no reported failure
gets nothing either (Vela reports its own builds).

``queue.report_state`` records the last state reported per delivery and says
whether this one is a change, so one state change gives one status, across
restarts of the bridge. A status GitHub does not take is logged: tried a few times
with backoff when the failure is transient, then dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson

from bridge.errors import QueueError
from bridge.github import GitHubError, RateLimited
from bridge.github.api import CommitStatus, GitHubClient
from bridge.github.auth import Auth
from bridge.queue import ClaimedJob, DeliveryRecord, Queue, Settlement
from bridge.states import DeliveryStatus, JobState

log = logging.getLogger("bridge.github.statuses")

CONTEXT = "vela-bridge"
MAX_DESCRIPTION = 140  # GitHub's limit for a commit status description
TRIES = 3
BACKOFF_SECONDS = 1.0  # then 2 s
_LONGEST_WAIT_SECONDS = 60.0  # a rate limit resetting later than this drops the status


def failure_status(error: str) -> CommitStatus:
    why = " ".join(error.split()) or "no reason was recorded"
    return CommitStatus("error", _fit(f"Could not be handed to Vela: {why}"), context=CONTEXT)


def success_status(link: str) -> CommitStatus:
    return CommitStatus(
        "success", "Handed to Vela after a restart", target_url=link, context=CONTEXT
    )


def _fit(text: str) -> str:
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 1] + "…"


def commit_of(job_body: bytes, summary: Mapping[str, Any], payload: Mapping[str, Any]) -> str:
    """The SHA the status goes on: the Vela request's ``commit``, else the payload's.

    Deployment-API jobs carry no commit in their body (mapping.md): ``deployment.sha``.
    """
    with contextlib.suppress(ValueError):
        body = orjson.loads(job_body)
        if isinstance(body, dict) and isinstance(body.get("commit"), str) and body["commit"]:
            return str(body["commit"])
    if isinstance(summary.get("commit"), str) and summary["commit"]:
        return str(summary["commit"])
    for outer, inner in (("deployment", "sha"), ("pull_request", "head")):
        value = payload.get(outer)
        if isinstance(value, dict):
            found = value.get(inner)
            if isinstance(found, dict):
                found = found.get("sha")
            if isinstance(found, str) and found:
                return found
    after = payload.get("after")
    return after if isinstance(after, str) else ""


class StatusReporter:
    def __init__(
        self,
        queue: Queue,
        client: GitHubClient,
        auth: Auth,
        *,
        tries: int = TRIES,
        backoff: float = BACKOFF_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._queue = queue
        self._client = client
        self._auth = auth
        self._tries = tries
        self._backoff = backoff
        self._sleep = sleep
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def on_settled(self, job: ClaimedJob, settlement: Settlement) -> None:
        """Start deciding on (and posting) a status in the background."""
        if settlement.state == JobState.RETRYING:
            return  # still on its way: nothing to report
        task = asyncio.create_task(self._report(job, settlement), name=f"status-{job.guid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle(self) -> None:
        """Wait until every report started so far has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self, grace: float) -> None:
        """Give pending reports ``grace`` seconds, then cancel the rest."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
            log.warning("%d commit statuses were not posted before shutdown", len(left))

    async def _report(self, job: ClaimedJob, settlement: Settlement) -> None:
        fields = {
            "delivery": job.guid,
            "repo": f"{job.org}/{job.repo}",
            "event": job.github_event,
            "action": job.action,
        }
        try:
            async with self._one_at_a_time(job.guid):
                record = await self._queue.delivery(job.guid)
                if record is None:
                    return
                status = await self._decide(record, settlement)
                if status is not None:
                    await self._post(job, record, status, fields)
        except QueueError as exc:
            log.warning(
                "no commit status: the queue cannot say what to report (%s)", exc, extra=fields
            )
        except Exception:  # a background task must say why it died, and never crash the bridge
            log.exception("reporting a commit status failed unexpectedly", extra=fields)

    async def _decide(self, record: DeliveryRecord, settlement: Settlement) -> CommitStatus | None:
        """The status this settlement calls for, claimed through report_state; or None."""
        guid = record.guid
        if record.status == DeliveryStatus.FAILURE:
            if not await self._queue.report_state(guid, "error"):
                return None  # already reported
            errors = [j.error for j in record.jobs if j.state == JobState.FAILURE and j.error]
            return failure_status(errors[0] if errors else settlement.error)
        if record.status != DeliveryStatus.SUCCESS:
            return None  # still running, skipped or killed: nothing to say
        if record.enqueued_at <= record.created_at:
            return None  # never restarted, so never failed: Vela reports its own build
        # Restarted: report success only if "error" was the last state reported. The
        # queue only answers "did it change?", so set "error" and see; when that was a
        # change no failure was reported, and the probe is undone.
        if await self._queue.report_state(guid, "error"):
            await self._queue.report_state(guid, "success")
            return None
        await self._queue.report_state(guid, "success")
        links = [j.vela_link for j in record.jobs if j.vela_link]
        return success_status(settlement.vela_link or (links[0] if links else ""))

    async def _post(
        self,
        job: ClaimedJob,
        record: DeliveryRecord,
        status: CommitStatus,
        fields: dict[str, str],
    ) -> None:
        raw = await self._queue.payload(record.guid)
        payload: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            loaded = orjson.loads(raw) if raw else {}
            payload = loaded if isinstance(loaded, dict) else {}
        repo = record.repo or _full_name(payload)
        sha = commit_of(job.body, record.summary, payload)
        installation = payload.get("installation")
        installation_id = installation.get("id") if isinstance(installation, dict) else None
        if not isinstance(installation_id, int) or isinstance(installation_id, bool):
            installation_id = None
        fields = {**fields, "repo": repo or fields["repo"], "sha": sha, "state": status.state}
        if not repo or not sha:
            log.warning(
                "no commit status: the delivery names no repository or commit", extra=fields
            )
            return
        for attempt in range(1, self._tries + 1):
            wait = self._backoff * 2 ** (attempt - 1)
            try:
                credential = await self._auth.for_repository(installation_id)
                if credential is None:
                    log.warning(
                        "no commit status: the delivery has no App installation"
                        " and github.token is not set",
                        extra=fields,
                    )
                    return
                await self._client.create_status(repo, sha, status, credential)
            except RateLimited as exc:
                if exc.retry_after > _LONGEST_WAIT_SECONDS:
                    log.warning("commit status dropped: %s", exc.message, extra=fields)
                    return
                wait = exc.retry_after
                reason = exc.message
            except GitHubError as exc:
                if exc.status_code == 401 and installation_id is not None:
                    self._auth.forget(installation_id)  # revoked: fetch a new one
                    wait = 0.0
                elif exc.status_code is not None and exc.status_code < 500:
                    log.warning("commit status refused: %s", exc.message, extra=fields)
                    return
                reason = exc.message
            else:
                log.info("commit status %s posted", status.state, extra=fields)
                return
            if attempt == self._tries:
                log.warning(
                    "commit status not posted after %d tries: %s", attempt, reason, extra=fields
                )
                return
            await self._sleep(wait)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, guid: str) -> AsyncIterator[None]:
        """Serialise the decisions about one delivery (its jobs may settle together)."""
        lock, users = self._locks.get(guid) or (asyncio.Lock(), 0)
        self._locks[guid] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[guid]
            if users == 1:
                del self._locks[guid]
            else:
                self._locks[guid] = (lock, users - 1)


def _full_name(payload: Mapping[str, Any]) -> str:
    repository = payload.get("repository")
    if isinstance(repository, dict) and isinstance(repository.get("full_name"), str):
        return str(repository["full_name"])
    return ""
