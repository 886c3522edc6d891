"""``POST /webhook``: limit → verify → parse → convert → enqueue → answer.

The checks run in the order of interface.md "Webhook intake"; the first that
applies answers. The size cap is starlette's route-level ``max_body_size`` (413
before anything else is read). Nothing here may raise past the handler: every
malformed input ends as a 4xx with a JSON ``{"error": …}``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from bridge import observability as metrics
from bridge import signature
from bridge.convert import Conversion, Policy, convert, read_payload
from bridge.errors import IntakeError, QueueError
from bridge.queue import Added, NewDelivery, NewJob, Queue

log = logging.getLogger("bridge.intake")

# X-GitHub-Delivery is a GUID; X-GitHub-Event a snake_case name. Anything else is not GitHub.
_GUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._:-]{0,99}")
_EVENT = re.compile(r"[a-z][a-z0-9_]{0,63}")
_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Intake:
    """The webhook endpoint; ``on_queued`` is told when forwarding work was added."""

    def __init__(
        self,
        queue: Queue,
        secrets: list[bytes],
        policy: Policy,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._queue = queue
        self._secrets = secrets
        self._policy = policy
        self._on_queued = on_queued

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        response, event, outcome = await self._handle(request)
        metrics.RECEIVED.labels(event, outcome).inc()
        metrics.INTAKE_DURATION.observe(time.perf_counter() - started)
        return response

    async def _handle(self, request: Request) -> tuple[Response, str, str]:
        """The answer, the event label ("" until the signature is verified) and the outcome."""
        received = time.time()
        try:
            body = await request.body()
        except HTTPException as exc:  # starlette's max_body_size: stop reading, answer 413
            if exc.status_code != 413:
                raise
            return _error(413, "the delivery is larger than server.max_body_bytes"), "", "too_large"
        headers = request.headers
        raw_signature = _raw_header(request, b"x-hub-signature-256")
        if not signature.verify(raw_signature, body, self._secrets):
            why = "missing" if raw_signature is None else "does not match any configured secret"
            log.info("refused: X-Hub-Signature-256 %s", why, extra={"status": "unauthorized"})
            return _error(401, f"X-Hub-Signature-256 {why}"), "", "unauthorized"
        event = headers.get("x-github-event", "")
        guid = headers.get("x-github-delivery", "")
        if not _EVENT.fullmatch(event):
            return _error(400, "X-GitHub-Event header missing or malformed"), "", "bad_request"
        if not _GUID.fullmatch(guid):
            return (
                _error(400, "X-GitHub-Delivery header missing or malformed"),
                event,
                "bad_request",
            )
        try:
            payload_bytes, payload = _parse(headers.get("content-type", ""), body, event)
            if event == "ping":
                return JSONResponse({"status": "pong"}), event, "pong"
            conversion = convert(event, payload, self._policy)
        except IntakeError as exc:
            log.info("refused: %s", exc.message, extra={"delivery": guid, "event": event})
            return _error(exc.status_code, exc.message), event, "bad_request"
        delivery = _delivery(guid, event, conversion, payload_bytes, received)
        try:
            added = await self._queue.add(delivery)
        except Exception as exc:  # QueueError, or a bug: either way not stored, so no 2xx
            if isinstance(exc, QueueError):
                log.error("cannot store delivery: %s", exc, extra=_fields(delivery))
            else:
                log.exception("cannot store delivery", extra=_fields(delivery))
            answer = _error(503, "the queue cannot store the delivery right now; try again")
            return answer, event, "unavailable"
        log.info(
            "delivery %s",
            added,
            extra={
                **_fields(delivery),
                "status": str(added),
                "reason": delivery.skip or "",
                "duration_ms": round((time.time() - received) * 1000, 2),
            },
        )
        if added is Added.QUEUED:
            self._on_queued()
            return JSONResponse({"status": "queued", "delivery": guid}, 202), event, "queued"
        if added is Added.DUPLICATE:
            return JSONResponse({"status": "duplicate", "delivery": guid}), event, "duplicate"
        metrics.FINISHED.labels("skipped").inc()
        answer = JSONResponse({"status": "skipped", "delivery": guid, "reason": delivery.skip})
        return answer, event, "skipped"


def _raw_header(request: Request, name: bytes) -> bytes | None:
    for key, value in request.scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _parse(content_type: str, body: bytes, event: str) -> tuple[bytes, dict[str, Any]]:
    """The payload as JSON bytes, and as a dict of the fields the conversion of ``event``
    reads (bridge.convert.fields), from either content type GitHub sends."""
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media not in (_JSON, _FORM):
        raise IntakeError(f"unsupported content type {media or '(none)'!r}", 415)
    charset = _charset(params)
    if charset not in (None, "utf-8", "utf8", "us-ascii"):
        raise IntakeError(f"unsupported charset {charset!r}: GitHub sends UTF-8")
    if media == _FORM:
        try:
            fields = parse_qs(body.decode("ascii"), errors="strict", max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise IntakeError("form body is not valid URL encoding") from None
        values = fields.get("payload", [])
        if len(values) != 1:
            raise IntakeError("form body must carry exactly one payload field")
        body = values[0].encode("utf-8", "surrogatepass")
    return body, read_payload(event, body)


def _charset(params: str) -> str | None:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def _delivery(
    guid: str, event: str, conversion: Conversion, payload: bytes, received: float
) -> NewDelivery:
    summary = conversion.summary
    return NewDelivery(
        guid=guid,
        github_event=event,
        action=summary.action,
        repo=summary.repo,
        event=summary.event,
        summary=summary,
        payload=payload,
        skip=conversion.skip,
        jobs=new_jobs(conversion),
        received_at=received,
    )


def new_jobs(conversion: Conversion) -> tuple[NewJob, ...]:
    """The queue's jobs for a conversion's requests, bodies serialised once."""
    return tuple(
        NewJob(
            endpoint=r.endpoint,
            org=r.org,
            repo=r.repo,
            path=r.path,
            body=orjson.dumps(r.body),
            lane=r.order_key,
            fallback=None if r.fallback is None else orjson.dumps(r.fallback),
        )
        for r in conversion.requests
    )


def _fields(d: NewDelivery) -> dict[str, str]:
    return {"delivery": d.guid, "repo": d.repo, "event": d.github_event, "action": d.action}
