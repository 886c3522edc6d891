"""create_app(config): routes and the lifespan that owns every resource, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge import github
from bridge import observability as metrics
from bridge.config import Config
from bridge.convert import Policy
from bridge.errors import BridgeError, QueueError
from bridge.forward import Forwarder
from bridge.intake import Intake, JSONResponse
from bridge.operator import OperatorAPI
from bridge.queue import Queue, open_queue
from bridge.vela import VelaClient

log = logging.getLogger("bridge.app")

SHUTDOWN_GRACE_SECONDS = 5.0
FORWARD_CONCURRENCY = 64  # requests to Vela in flight at most (and pooled connections)
_PURGE_INTERVAL_SECONDS = 3600.0


class _State:
    """What the lifespan opens, for the handlers to use."""

    queue: Queue
    forwarder: Forwarder
    intake: Intake


def create_app(config: Config) -> Starlette:
    state = _State()
    policy = Policy(config.events.deployment, config.events.fork_pull_requests)

    async def webhook(request: Request) -> Response:
        return await state.intake(request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.queue = await open_queue(
            config.queue.url,
            lease_seconds=config.queue.lease_seconds,
            retention_days=config.queue.retention_days,
        )
        vela = VelaClient(
            config.vela.url,
            config.vela.token,
            timeout=config.vela.timeout_seconds,
            connections=FORWARD_CONCURRENCY,
        )
        await vela.open()
        talkback = github.start(config.github, state.queue)
        state.forwarder = Forwarder(
            state.queue,
            vela,
            config.retry,
            concurrency=FORWARD_CONCURRENCY,
            probe_seconds=config.vela.auth_retry_seconds,
            lease_seconds=config.queue.lease_seconds,
            on_settled=talkback.on_settled,
        )
        state.intake = Intake(
            state.queue,
            [s.value.encode() for s in config.github.webhook_secrets],
            policy,
            on_queued=state.forwarder.note_intake,
        )
        state.forwarder.start()
        purger = asyncio.create_task(_purge_forever(state.queue), name="purge")
        try:
            yield
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            await _shut_down(
                ("stopping forwarding", lambda: state.forwarder.stop(SHUTDOWN_GRACE_SECONDS)),
                ("closing the GitHub client", talkback.close),
                ("closing the Vela client", vela.close),
                ("closing the queue", state.queue.close),
            )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await asyncio.wait_for(state.queue.ping(), timeout=2.0)
        except (QueueError, TimeoutError) as exc:
            return JSONResponse({"status": "unavailable", "reason": f"queue: {exc}"}, 503)
        paused = state.forwarder.paused_reason
        if paused is not None:
            return JSONResponse({"status": "paused", "reason": paused}, 503)
        return JSONResponse({"status": "ready"})

    async def metrics_endpoint(request: Request) -> Response:
        with contextlib.suppress(QueueError, TimeoutError):
            depth, age = await asyncio.wait_for(state.queue.stats(time.time()), timeout=2.0)
            metrics.QUEUE_DEPTH.set(depth)
            metrics.OLDEST_PENDING_AGE.set(age)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    operator = OperatorAPI(
        lambda: state.queue,
        config.operator.token,
        policy,
        config.vela.url,
        on_queued=lambda: state.forwarder.wake(),
    )
    routes = [
        Route("/webhook", webhook, methods=["POST"], max_body_size=config.server.max_body_bytes),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *operator.routes(),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _shut_down(*steps: tuple[str, Callable[[], Awaitable[object]]]) -> None:
    """Run every step, each even when one before it failed: a queue that refuses writes
    (fail-stop after a failed sync) cannot release the in-flight claims, and must not
    keep the clients and the queue itself from being closed too (STYLE.md 8)."""
    for name, step in steps:
        try:
            await step()
        except (BridgeError, OSError) as exc:  # expected: the message says it all
            log.error("shutdown: %s failed: %s", name, exc)
        except Exception:  # a bug: its traceback, once
            log.exception("shutdown: %s failed", name)


async def _purge_forever(queue: Queue) -> None:
    """Retention (queue.retention_days), at start-up and hourly, in short steps."""
    while True:
        removed = 0
        try:
            while (step := await queue.purge(time.time())) > 0:
                removed += step
                await asyncio.sleep(0.05)  # let deliveries in between
        except Exception:  # retention must go on next hour whatever failed this time
            log.exception("retention pass failed")
        if removed:
            log.info("retention: %d old deliveries trimmed", removed)
        await asyncio.sleep(_PURGE_INTERVAL_SECONDS)
