"""Workers: claim → send → settle, with retries that live in the queue.

One dispatcher claims due jobs (heads of their lanes) up to the concurrency
limit and runs each in a task; a task sends the job to Vela, turns the answer
into a :class:`~bridge.queue.Settlement` and settles it. Retry waits follow
interface.md "Forwarding to Vela": the n-th retry waits
``min(max_backoff, initial × 2^(n−1))`` (tenacity's ``wait_exponential``) plus up to
25 % jitter, or ``Retry-After`` up to max_backoff. 401/403 pause forwarding
without consuming attempts; while paused, the token is tried every 30 s, with one
due job or, when none is due, with ``GET /api/v1/user``. Any answer that shows Vela
took the token (a 2xx of Vela's, to whichever request) ends the pause. Time paused
is no part of a job's age (retry.max_age_seconds); a retry that comes due past that
age is not sent: the job fails then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import tenacity

from bridge import observability as metrics
from bridge.config import RetryConfig
from bridge.errors import ForwardError, QueueError, Rejected, Retryable, Unauthorized
from bridge.pause import PROBE_SECONDS, Pause
from bridge.queue import Attempt, ClaimedJob, Queue, Settlement
from bridge.states import FINISHED, JobState
from bridge.vela import Accepted, VelaClient, builds_path

log = logging.getLogger("bridge.forward")

_IDLE_POLL_SECONDS = 1.0
# A burst: at least _BURST_DELIVERIES queued within _BURST_WINDOW seconds (200/s). While one
# lasts, forwarding runs at _BURST_CONCURRENCY so the event loop answers GitHub first
# (issue 9: answering may be favoured over forwarding, as long as the drain keeps up after).
_BURST_WINDOW = 0.1
_BURST_DELIVERIES = 20
_BURST_CONCURRENCY = 4
# An attempt (a deployment check, a lookup, the send: each up to vela.timeout_seconds)
# must end within this share of its claim's lease, so that it settles before the lease
# runs out and the job is taken again while in flight (interface.md: "never in flight
# twice at once"). One cut short is unclear: the next attempt looks in Vela first. The
# share counts from the time the claim was made with, as the lease does, not from the
# attempt's start: the claim's own wait (the writer, a lock, the pool, a busy loop)
# has used up part of the lease already.
_ATTEMPT_SHARE_OF_LEASE = 0.9


class Backoff:
    """The wait before the n-th retry (n from 1), jittered; tenacity computes the curve."""

    def __init__(self, retry: RetryConfig, rng: random.Random | None = None) -> None:
        self._curve = tenacity.wait_exponential(
            multiplier=retry.initial_backoff_seconds, max=retry.max_backoff_seconds
        )
        self._max = retry.max_backoff_seconds
        self._rng = rng or random.Random()

    def wait(self, retry_number: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self._max)
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = retry_number
        base = float(self._curve(state))
        return base + self._rng.uniform(0, 0.25 * base)


class Forwarder:
    def __init__(
        self,
        queue: Queue,
        vela: VelaClient,
        retry: RetryConfig,
        *,
        concurrency: int = 64,
        probe_seconds: float = PROBE_SECONDS,
        lease_seconds: float = 60.0,
        on_settled: Callable[[ClaimedJob, Settlement], Awaitable[None]] | None = None,
    ) -> None:
        self._queue = queue
        self._attempt_seconds = lease_seconds * _ATTEMPT_SHARE_OF_LEASE
        self._vela = vela
        self._retry = retry
        self._backoff = Backoff(retry)
        self._concurrency = concurrency
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[int, asyncio.Task[None]] = {}  # job id → its latest claim's task
        # Every attempt still running, including one whose job a later claim took over
        # after its lease ran out (no longer in _inflight): stop() waits for all of them.
        self._attempts: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._pause = Pause(probe_seconds)
        self._task: asyncio.Task[None] | None = None
        self._on_settled = on_settled
        self._window_start = 0.0
        self._window_count = 0
        self._burst_until = 0.0
        self._token_check: asyncio.Task[None] | None = None
        vela.on_authorized = self._resume

    @property
    def paused_reason(self) -> str | None:
        """Why forwarding is paused (a refused token), or None (/readyz)."""
        return self._pause.reason

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch(), name="forwarder")

    def wake(self) -> None:
        """New work may be due (a delivery was restarted, or a lane moved on)."""
        self._wake.set()

    def note_intake(self) -> None:
        """A delivery was queued: work is due, and a burst may be on."""
        now = time.monotonic()
        if now - self._window_start > _BURST_WINDOW:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count >= _BURST_DELIVERIES:
            self._burst_until = now + _BURST_WINDOW
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let in-flight attempts settle for ``grace`` s; release the rest."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._attempts:
            await asyncio.wait(list(self._attempts), timeout=grace)
        left = list(self._inflight)  # only the latest claims: a superseded one is not ours
        unfinished = list(self._attempts)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if left:
            await self._queue.release(left, time.time())
            log.info("released %d unfinished claims", len(left))

    async def _dispatch(self) -> None:
        while not self._stopping:
            try:
                await self._dispatch_once()
            except QueueError as exc:
                log.error("forwarding cannot read the queue: %s", exc)
                await self._sleep(_IDLE_POLL_SECONDS)

    async def _dispatch_once(self) -> None:
        probing = self.paused_reason is not None
        if probing:
            # One job probes the token every probe_seconds; the rest wait. Wake-ups (new
            # deliveries, settled jobs) do not shorten the wait: it is a deadline.
            if self._inflight or self._token_check is not None:
                await self._wait_slot()
                return
            wait = self._pause.probe_wait()
            if wait > 0:
                await asyncio.sleep(min(wait, _IDLE_POLL_SECONDS))
                return
            limit = 1
        else:
            burst = time.monotonic() < self._burst_until
            limit = (_BURST_CONCURRENCY if burst else self._concurrency) - len(self._inflight)
            if limit <= 0:
                await self._wait_slot(_BURST_WINDOW if burst else _IDLE_POLL_SECONDS)
                return
        self._wake.clear()
        claimed_at = time.time()  # the queue's leases run from this (wall) time
        jobs = await self._queue.claim(limit, claimed_at)
        for job in jobs:
            task = asyncio.create_task(self._run(job, claimed_at), name=f"job-{job.id}")
            self._inflight[job.id] = task
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)
        if probing and not jobs and self.paused_reason is not None:
            # A probe is due and no job is, to make it with: ask Vela about the token.
            # (Only a probe: a pause that began during a claim made at full speed waits
            # for its first probe like any other.)
            self._start_token_check()
        if jobs or self.paused_reason is not None:
            return
        due = await self._queue.next_due()
        delay = _IDLE_POLL_SECONDS if due is None else max(0.0, due - time.time())
        await self._sleep(min(delay, _IDLE_POLL_SECONDS))

    def _start_token_check(self) -> None:
        task = asyncio.create_task(self._check_token(), name="token-check")
        self._token_check = task
        self._attempts.add(task)  # stop() waits for it, then cancels it
        task.add_done_callback(self._attempts.discard)

    async def _check_token(self) -> None:
        """A probe with no job (one cancelled, or none left after the lookup that found its
        build): a 2xx resumes, 401/403 keeps the pause, anything else tells nothing and
        the next probe asks again."""
        try:
            await self._vela.check_token()
        except Unauthorized as exc:
            self._pause.begin(exc.message)
        except ForwardError as exc:
            log.warning(
                "token check inconclusive: %s; asking again in %g s",
                exc.message,
                self._pause.probe_seconds,
            )
        except Exception:  # a bug: logged; the next probe asks again
            log.exception("token check failed unexpectedly")
        else:
            self._resume()
        finally:
            self._token_check = None
            self._slot_free.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _wait_slot(self, timeout: float = _IDLE_POLL_SECONDS) -> None:
        self._slot_free.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._slot_free.wait(), timeout=timeout)

    def _runs(self, job: ClaimedJob) -> bool:
        """Whether this task runs the job's latest claim (a later claim's task may have
        replaced it in _inflight after its lease ran out)."""
        return self._inflight.get(job.id) is asyncio.current_task()

    async def _run(self, job: ClaimedJob, claimed_at: float) -> None:
        settled = False
        try:
            # The lease is in wall time (claimed_at + queue.lease_seconds), and so is the
            # attempt's deadline: the claim's own wait has used up part of it already.
            deadline = claimed_at + self._attempt_seconds
            if time.time() >= deadline:
                self._leave(job, claimed_at)
                return
            settlement, endpoint = await self._attempt(job, deadline)
            recorded = await self._queue.settle(job.id, settlement, time.time(), claim=job.claim)
            settled = True
            _count(endpoint, settlement, finished=recorded)
            if not recorded:  # its lease was retaken: the new claim's outcome is the one
                return
            self._log(job, settlement, endpoint)
            if self._on_settled is not None:
                await self._on_settled(job, settlement)
        except QueueError as exc:
            # Its claim stays until queue.lease_seconds runs out; then it is taken again.
            log.error("cannot settle job %s: %s", job.id, exc, extra=_fields(job))
        except Exception as exc:  # a bug: the job must not stay claimed, its lane blocked
            log.exception("job %s failed unexpectedly", job.id, extra=_fields(job))
            if not settled and self._runs(job):
                await self._settle_bug(job, exc)
        finally:
            if self._runs(job):
                del self._inflight[job.id]
            self._slot_free.set()
            self._wake.set()  # the lane may have a next job now

    async def _settle_bug(self, job: ClaimedJob, exc: Exception) -> None:
        """An attempt that failed on a bug of the bridge counts as a failed attempt, unclear
        (it may have sent): retried after a backoff, then a failure, never a hot loop."""
        why = Retryable(f"the bridge failed on this job ({type(exc).__name__}); see its log")
        settlement = self._failed(job, why, time.time(), 0.0)
        try:
            await self._queue.settle(job.id, settlement, time.time(), claim=job.claim)
        except Exception:  # the queue refused it too: the lease ends the claim
            log.exception("job %s: cannot record the failure", job.id, extra=_fields(job))

    def _leave(self, job: ClaimedJob, claimed_at: float) -> None:
        """A claim whose attempt could not start before its deadline: nothing is sent, and
        nothing settled either. Its lease has run out or nearly so, and the next claim
        may already hold the job; left alone, the claim runs out and the job is taken
        again, as unclear, at no cost to its attempts."""
        log.warning(
            "job %s not sent: its claim was %.1f s old when the attempt could start,"
            " past %g s; left for its lease to run out",
            job.id,
            time.time() - claimed_at,
            self._attempt_seconds,
            extra=_fields(job),
        )

    def _too_old(self, job: ClaimedJob) -> Settlement | None:
        """interface.md: a job that has been retrying for retry.max_age_seconds fails. One
        whose retry comes due after that is not sent again (it could make a build up to
        max_backoff late): it fails now, with its latest error. (An unclear one is looked
        up in Vela first: its last attempt may have made the build.)"""
        if job.first_attempt_at is None:
            return None
        now = time.time()
        paused = self._paused_since_last(job, now)
        if now - (job.first_attempt_at + paused) < self._retry.max_age_seconds:
            return None
        error = self._too_old_error(job.attempts, job.last_error)
        return Settlement(
            JobState.FAILURE, None, consumed=False, paused=paused, error=error, unclear=job.unclear
        )

    def _paused_since_last(self, job: ClaimedJob, now: float) -> float:
        """interface.md: a 401/403 fails nothing. The time forwarding was paused since the
        job's previous attempt (whether it probed the token or waited) is no part of its
        age: its first attempt moves forward by it (Settlement.paused)."""
        if job.first_attempt_at is None or job.last_attempt_at is None:
            return 0.0
        return self._pause.between(job.last_attempt_at, now)

    def _too_old_error(self, attempts: int, error: str) -> str:
        why = f"gave up after {attempts} attempts / {self._retry.max_age_seconds:g} s"
        return f"{why}: {error}" if error else why

    async def _attempt(self, job: ClaimedJob, deadline: float) -> tuple[Settlement, str]:
        """One attempt at the job, cut at ``deadline`` (wall time): the settlement, and
        the endpoint it went to."""
        started = time.time()
        clock = time.monotonic()
        endpoint = job.endpoint
        try:
            # The wall-clock deadline becomes a delay on the loop's monotonic clock, once.
            async with asyncio.timeout(deadline - started):
                endpoint, path, body = await self._target(job)
                if job.unclear:
                    found = await self._find(job, endpoint, body)
                    if found is not None:
                        return Settlement(
                            JobState.SUCCESS,
                            None,
                            consumed=False,
                            vela_number=found.number,
                            vela_link=found.link,
                            vela_deployment=found.number if endpoint == "deployments" else None,
                        ), endpoint
                too_old = self._too_old(job)
                if too_old is not None:
                    return too_old, endpoint
                answer = await self._vela.send(path, body, job.guid)
        except TimeoutError:
            late = Retryable(
                f"the attempt did not end within {self._attempt_seconds:g} s of its claim"
            )
            return self._failed(job, late, started, time.monotonic() - clock), endpoint
        except ForwardError as exc:
            return self._failed(job, exc, started, time.monotonic() - clock), endpoint
        attempt = Attempt(started, time.monotonic() - clock, answer.status, "", answer.excerpt)
        self._resume()
        if isinstance(answer, Accepted):
            return Settlement(
                JobState.SUCCESS,
                attempt,
                vela_number=answer.number,
                vela_link=answer.link,
                vela_deployment=answer.number if endpoint == "deployments" else None,
            ), endpoint
        return Settlement(JobState.SKIPPED, attempt, error=answer.reason), endpoint

    async def _target(self, job: ClaimedJob) -> tuple[str, str, bytes]:
        """Where the job goes: (endpoint, path, body).

        mapping.md, deployment: a GitHub deployment Vela made itself (the bridge
        recorded its number when Vela answered, or Vela knows it) is forwarded as a
        build, never as another deployment request. The lane (repository and
        environment) holds an early echo until the request that caused it settled.
        """
        if job.endpoint != "deployments" or job.fallback is None:
            return job.endpoint, job.path, job.body
        number = orjson.loads(job.fallback).get("deploy_number")
        if isinstance(number, int) and (
            await self._queue.is_vela_deployment(f"{job.org}/{job.repo}", number)
            or await self._vela.deployment_exists(job.org, job.repo, number)
        ):
            return "builds", builds_path(job.org, job.repo), job.fallback
        return job.endpoint, job.path, job.body

    async def _find(self, job: ClaimedJob, endpoint: str, body: bytes) -> Accepted | None:
        """After an unclear attempt: what an earlier attempt may have created in Vela."""
        request = orjson.loads(body)
        # Not an older build or deployment of the same commit, ref or environment (a
        # routine redeploy, a commit pushed again): one made since this run of the job
        # was first claimed.
        since = job.first_claimed_at or job.first_attempt_at or 0.0
        if endpoint == "deployments":
            return await self._vela.find_deployment(job.org, job.repo, request, since)
        return await self._vela.find_build(job.org, job.repo, request, since)

    def _failed(
        self, job: ClaimedJob, exc: ForwardError, started: float, took: float
    ) -> Settlement:
        attempt = Attempt(started, took, exc.status_code, exc.message, exc.body)
        now = time.time()
        paused = self._paused_since_last(job, now)
        if isinstance(exc, Unauthorized):
            self._pause.begin(exc.message)
            return Settlement(
                JobState.RETRYING,
                attempt,
                consumed=False,
                paused=paused,
                next_attempt_at=now,
                error=exc.message,
                unclear=job.unclear,
            )
        if isinstance(exc, Rejected):
            self._resume()
            return Settlement(JobState.FAILURE, attempt, error=exc.message)
        assert isinstance(exc, Retryable)
        attempts = job.attempts + 1
        first = started if job.first_attempt_at is None else job.first_attempt_at + paused
        unclear = job.unclear or exc.sent
        if attempts >= self._retry.max_attempts:
            why = f"gave up after {attempts} attempts: {exc.message}"
            return Settlement(JobState.FAILURE, attempt, error=why, unclear=unclear)
        if now - first >= self._retry.max_age_seconds:
            why = self._too_old_error(attempts, exc.message)
            return Settlement(JobState.FAILURE, attempt, error=why, unclear=unclear)
        # A retry that comes due past max_age is not sent then (_too_old). It is not
        # brought forward to the max age either: a pause meanwhile would leave the job
        # younger than that, and it would be sent before its backoff (or Retry-After) ran.
        wait = self._backoff.wait(attempts, exc.retry_after)
        return Settlement(
            JobState.RETRYING,
            attempt,
            paused=paused,
            next_attempt_at=now + wait,
            error=exc.message,
            unclear=unclear,
        )

    def _resume(self) -> None:
        if self._pause.end():
            self._wake.set()

    def _log(self, job: ClaimedJob, s: Settlement, endpoint: str) -> None:
        a = s.attempt
        log.info(
            "forward %s",
            s.state,
            extra={
                **_fields(job),
                "status": str(s.state),
                "endpoint": endpoint,
                "attempt": job.attempts + int(s.consumed and a is not None),
                "http_status": a.http_status if a else None,
                "duration_ms": round(a.duration * 1000, 1) if a else 0,
                "error": s.error,
                "next_attempt_at": s.next_attempt_at if s.state == JobState.RETRYING else None,
            },
        )


def _count(endpoint: str, s: Settlement, *, finished: bool) -> None:
    """The attempt, which was made either way; the final state only if it was recorded."""
    if s.attempt is not None:
        result = metrics.attempt_result(s.attempt.http_status)
        metrics.FORWARD_ATTEMPTS.labels(endpoint, result).inc()
        metrics.FORWARD_DURATION.observe(s.attempt.duration)
    if finished and s.state in FINISHED:
        metrics.FINISHED.labels(str(s.state)).inc()


def _fields(job: ClaimedJob) -> dict[str, Any]:
    return {
        "delivery": job.guid,
        "repo": f"{job.org}/{job.repo}",
        "event": job.github_event,
        "action": job.action,
        "job": job.number,
    }
