"""The catch-up sweep (github.md "Catch-up"): ask GitHub again for what it failed to deliver.

GitHub never retries a delivery. At start-up and every
``github.redeliver_interval_seconds`` the sweep lists the hook's deliveries back to
``github.redeliver_lookback_hours`` (one entry per attempt), keeps each GUID whose
*every* attempt got no answer (status 0) or a 5xx, drops those the bridge has stored
(the queue knows every GUID it acknowledged) and asks GitHub to redeliver the rest,
oldest first, at most ``github.redeliver_max_per_sweep`` requests a sweep, whether
GitHub accepts them or refuses them (github.md: the bound is on requests, so a GitHub
that refuses is not sent the whole backlog in one sweep). A GUID answered 4xx
on purpose (bad signature, too large) or 2xx is never asked for; neither is a ``ping``,
which the bridge answers without storing. The redelivery arrives as a normal signed
webhook and the GUID dedupe makes the sweep idempotent.

Only the holder of the queue lease ``github-sweep`` sweeps, so one replica at a time
does. A GitHub error ends the hook's sweep (github.md: errors delay the sweep), and a
rate limit also moves the next sweep to when GitHub allows it. One answer is about
the delivery, not about GitHub: a redelivery refused as not found or not redeliverable
(404, 410, 422). Such a GUID is passed over, and this process does not ask for it
again, so a few deliveries GitHub will never redeliver cannot use up every sweep's
bound ahead of newer ones. Nothing here ever stops the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import Counter

from bridge.config import GitHubConfig
from bridge.errors import QueueError
from bridge.github import GitHubError, RateLimited
from bridge.github.api import Credential, DeliveryAttempt, GitHubClient, Hook
from bridge.github.auth import Auth
from bridge.queue import Queue

log = logging.getLogger("bridge.github.sweep")

SWEEPS = Counter(
    "vela_bridge_github_sweeps",
    "Catch-up sweeps of GitHub's webhook deliveries, by result"
    " (ok, error, rate_limited; standby: another replica holds the sweep)",
    ["result"],
)
REDELIVERIES = Counter(
    "vela_bridge_github_redeliveries_requested",
    "Redeliveries the catch-up sweep asked GitHub for",
)
for _result in ("ok", "error", "rate_limited", "standby"):
    SWEEPS.labels(_result)  # listed at 0 from the start, as Prometheus prefers

# A redelivery refused with one of these is about that delivery (gone, or not one GitHub
# will send again); any other refusal is about GitHub or the credential, and ends the sweep.
_UNREDELIVERABLE = frozenset({404, 410, 422})

LEASE_NAME = "github-sweep"
_LEASE_MARGIN_SECONDS = 60.0  # a sweep may take a while; another replica waits this much longer


def failed(attempts: Iterable[DeliveryAttempt]) -> list[DeliveryAttempt]:
    """The newest attempt of each GUID that never got an answer below 500, oldest GUID first.

    Pure. ``status_code`` 0 means no answer; any 1xx–4xx answer means the bridge
    decided on it (stored it, or refused it on purpose), so it is not asked for again.
    """
    by_guid: dict[str, list[DeliveryAttempt]] = {}
    for attempt in attempts:
        by_guid.setdefault(attempt.guid, []).append(attempt)
    found: list[tuple[float, DeliveryAttempt]] = []
    for tries in by_guid.values():
        if any(0 < t.status_code < 500 for t in tries) or any(t.event == "ping" for t in tries):
            continue
        newest = max(tries, key=lambda t: (t.delivered_at, t.id))
        found.append((min(t.delivered_at for t in tries), newest))
    found.sort(key=lambda pair: (pair[0], pair[1].id))
    return [attempt for _, attempt in found]


@dataclass(frozen=True, slots=True)
class SweepReport:
    result: str  # "ok", "error", "rate_limited" or "standby"
    requested: tuple[str, ...]  # GUIDs GitHub was asked to redeliver (and accepted)
    left: int  # candidates left for the next sweep: by the bound, or by an error
    next_in: float  # seconds until the next sweep
    refused: int = 0  # redelivery requests GitHub refused (not rate limits: those end it)


class Sweeper:
    def __init__(
        self,
        config: GitHubConfig,
        queue: Queue,
        client: GitHubClient,
        auth: Auth,
        *,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queue = queue
        self._client = client
        self._interval = config.redeliver_interval_seconds
        self._lookback = config.redeliver_lookback_hours * 3600.0
        self._max = config.redeliver_max_per_sweep
        self._clock = clock
        self.holder = holder or uuid.uuid4().hex
        self._hooks: list[tuple[Hook, Callable[[], Credential]]] = []
        if auth.is_app:
            self._hooks.append((Hook.app(), auth.app_jwt))
        if auth.has_token:
            self._hooks.extend((Hook.configured(h), auth.token) for h in config.hooks)
        self._task: asyncio.Task[None] | None = None
        self._leading = False
        # (hook, GUID) GitHub would not redeliver (_UNREDELIVERABLE) → when it was delivered,
        # to forget it once past the lookback. Per hook: the same GUID reaches every hook
        # of the event, each with a delivery of its own that GitHub may still redeliver.
        self._unredeliverable: dict[tuple[str, str], float] = {}

    def start(self, first_delay: float) -> None:
        self._task = asyncio.create_task(self._run(first_delay), name="github-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._leading:  # hand the lease on at once (ttl 0) rather than when it runs out
            with contextlib.suppress(QueueError):
                await self._queue.try_lead(LEASE_NAME, self.holder, 0.0, self._clock())
            self._leading = False

    async def _run(self, first_delay: float) -> None:
        await asyncio.sleep(first_delay)
        while True:
            try:
                report = await self.sweep()
                wait = report.next_in
            except Exception:  # the sweep is optional: a bug in it must not end the loop
                log.exception("github sweep failed unexpectedly")
                SWEEPS.labels("error").inc()
                wait = self._interval
            await asyncio.sleep(wait)

    async def sweep(self) -> SweepReport:
        """One sweep: list, pick, redeliver; counted, logged, never raising GitHub errors."""
        now = self._clock()
        try:
            self._leading = await self._queue.try_lead(
                LEASE_NAME, self.holder, self._interval + _LEASE_MARGIN_SECONDS, now
            )
        except QueueError as exc:
            log.warning("github sweep skipped: the queue cannot say who sweeps (%s)", exc)
            return self._finish(SweepReport("error", (), 0, self._interval))
        if not self._leading:
            log.debug("github sweep: another replica holds the %s lease", LEASE_NAME)
            return self._finish(SweepReport("standby", (), 0, self._interval))

        result, requested, refused_total, left, wait = "ok", [], 0, 0, self._interval
        budget = self._max  # redelivery requests, accepted or refused, across the hooks
        for hook, credential in self._hooks:
            try:
                asked, more, refused = await self._sweep_hook(hook, credential(), now, budget)
            except RateLimited as exc:
                log.warning(
                    "github sweep rate-limited; next sweep in %.0f s: %s",
                    max(wait, exc.retry_after),
                    exc.message,
                    extra={"hook": hook.label, "retry_after": exc.retry_after},
                )
                result, wait = "rate_limited", max(wait, exc.retry_after)
                break
            except (GitHubError, QueueError) as exc:
                log.warning("github sweep of the %s failed: %s", hook.label, exc)
                result = "error"
                continue
            requested.extend(asked)
            refused_total += refused
            budget -= len(asked) + refused
            left += more
            if refused:
                result = "error"
        report = SweepReport(result, tuple(requested), left, wait, refused_total)
        if self._leading:  # keep the lease until the next sweep, even a delayed one
            with contextlib.suppress(QueueError):
                await self._queue.try_lead(
                    LEASE_NAME, self.holder, wait + _LEASE_MARGIN_SECONDS, self._clock()
                )
        return self._finish(report)

    async def _sweep_hook(
        self, hook: Hook, credential: Credential, now: float, budget: int
    ) -> tuple[list[str], int, int]:
        """Redeliver the hook's failed, unstored GUIDs, making at most ``budget`` requests.

        Returns the GUIDs asked for, how many candidates were left for the next sweep
        (by the bound, or by an error that ended this one), and how many redeliveries
        GitHub refused. A refused request counts against ``budget`` like an accepted one.
        """
        since = now - self._lookback
        attempts = [a async for a in self._client.deliveries(hook, credential, since)]
        for key, delivered_at in list(self._unredeliverable.items()):
            if delivered_at < since:
                del self._unredeliverable[key]
        candidates = [
            a for a in failed(attempts) if (hook.label, a.guid) not in self._unredeliverable
        ]
        asked: list[str] = []
        refused = 0
        for index, attempt in enumerate(candidates):
            if len(asked) + refused >= budget:
                log.info(
                    "github sweep bound reached (redeliver_max_per_sweep = %d);"
                    " %d candidates left for the next sweep",
                    self._max,
                    len(candidates) - index,
                    extra={"hook": hook.label},
                )
                return asked, len(candidates) - index, refused
            if await self._queue.delivery(attempt.guid) is not None:
                continue  # stored after all (GitHub gave up waiting for the answer)
            try:
                await self._client.redeliver(hook, attempt.id, credential)
            except RateLimited:
                raise
            except GitHubError as exc:
                refused += 1
                fields = {"delivery": attempt.guid, "event": attempt.event, "hook": hook.label}
                if exc.status_code in _UNREDELIVERABLE:
                    log.warning(
                        "github refused a redelivery, not asked for again: %s",
                        exc.message,
                        extra=fields,
                    )
                    self._unredeliverable[hook.label, attempt.guid] = attempt.delivered_at
                    continue
                left = len(candidates) - index
                log.warning(
                    "github refused a redelivery; the sweep of the %s stops, %d candidates"
                    " left for the next sweep: %s",
                    hook.label,
                    left,
                    exc.message,
                    extra=fields,
                )
                return asked, left, refused
            REDELIVERIES.inc()
            asked.append(attempt.guid)
            log.info(
                "asked github to redeliver",
                extra={
                    "delivery": attempt.guid,
                    "event": attempt.event,
                    "hook": hook.label,
                    "last_status": attempt.status_code,
                },
            )
        log.debug(
            "github sweep of the %s: %d attempts listed, %d never answered",
            hook.label,
            len(attempts),
            len(candidates),
        )
        return asked, 0, refused

    def _finish(self, report: SweepReport) -> SweepReport:
        SWEEPS.labels(report.result).inc()
        if report.result != "standby":
            log.info(
                "github sweep %s: %d redeliveries requested%s",
                report.result,
                len(report.requested),
                f", {report.refused} refused" if report.refused else "",
                extra={
                    "requested": len(report.requested),
                    "refused": report.refused,
                    "left": report.left,
                    "next_in": round(report.next_in, 1),
                },
            )
        return report
