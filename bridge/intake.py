"""``POST /webhook``: limit → verify → parse → convert → enqueue → answer.

The checks run in the order of interface.md "Webhook intake"; the first that
applies answers. The size cap is starlette's route-level ``max_body_size`` (413
before anything else is read). Nothing here may raise past the handler: every
malformed input ends as a 4xx with a JSON ``{"error": …}``. Every answer, a
refusal too, leaves one log line: the GUID and event as GitHub's headers name
them (when well-formed), repo and action once read, the status and the reason;
never the signature.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple
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
        answer = await self._handle(request)
        elapsed = time.perf_counter() - started
        metrics.RECEIVED.labels(answer.event, answer.outcome).inc()
        metrics.INTAKE_DURATION.observe(elapsed)
        # One line for every answer (interface.md "Operations"), refusals included.
        log.log(
            logging.ERROR if answer.response.status_code >= 500 else logging.INFO,
            "delivery %s",
            answer.outcome,
            exc_info=answer.error,
            extra={
                **answer.fields,
                "status": answer.outcome,
                "http_status": answer.response.status_code,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
        return answer.response

    async def _handle(self, request: Request) -> _Answer:
        """The checks of interface.md in order; the answer and what its log line says."""
        received = time.time()
        headers = request.headers
        event = headers.get("x-github-event", "")
        guid = headers.get("x-github-delivery", "")
        # What GitHub's headers name, when well-formed: even a refusal's log line has them.
        sent = {
            "delivery": guid if _GUID.fullmatch(guid) else "",
            "repo": "",
            "event": event if _EVENT.fullmatch(event) else "",
            "action": "",
            "reason": "",
        }
        try:
            body = await request.body()
        except HTTPException as exc:  # starlette's max_body_size: stop reading, answer 413
            if exc.status_code != 413:
                raise
            why = "the delivery is larger than server.max_body_bytes"
            return _refused(413, why, "too_large", "", sent)
        raw_signature = _raw_header(request, b"x-hub-signature-256")
        if not signature.verify(raw_signature, body, self._secrets):
            why = "missing" if raw_signature is None else "does not match any configured secret"
            return _refused(401, f"X-Hub-Signature-256 {why}", "unauthorized", "", sent)
        if not sent["event"]:
            why = "X-GitHub-Event header missing or malformed"
            return _refused(400, why, "bad_request", "", sent)
        if not sent["delivery"]:
            why = "X-GitHub-Delivery header missing or malformed"
            return _refused(400, why, "bad_request", event, sent)
        try:
            payload_bytes, payload = _parse(headers.get("content-type", ""), body, event)
            if event == "ping":
                return _Answer(JSONResponse({"status": "pong"}), "pong", event, sent)
            conversion = convert(event, payload, self._policy)
        except IntakeError as exc:
            return _refused(exc.status_code, exc.message, "bad_request", event, sent)
        delivery = _delivery(guid, event, conversion, payload_bytes, received)
        try:
            added = await self._queue.add(delivery)
        except Exception as exc:  # QueueError, or a bug: either way not stored, so no 2xx
            answer = _error(503, "the queue cannot store the delivery right now; try again")
            if isinstance(exc, QueueError):
                fields = _fields(delivery, f"cannot store the delivery: {exc}")
                return _Answer(answer, "unavailable", event, fields)
            fields = _fields(delivery, "cannot store the delivery: a bug")
            return _Answer(answer, "unavailable", event, fields, exc)  # with its traceback
        fields = _fields(delivery, delivery.skip or "")
        if added is Added.QUEUED:
            self._on_queued()
            answer = JSONResponse({"status": "queued", "delivery": guid}, 202)
            return _Answer(answer, "queued", event, fields)
        if added is Added.DUPLICATE:
            answer = JSONResponse({"status": "duplicate", "delivery": guid})
            return _Answer(answer, "duplicate", event, fields)
        metrics.FINISHED.labels("skipped").inc()
        answer = JSONResponse({"status": "skipped", "delivery": guid, "reason": delivery.skip})
        return _Answer(answer, "skipped", event, fields)


class _Answer(NamedTuple):
    """What intake answered, for the metrics and the log line every answer gets."""

    response: Response
    outcome: str  # the metrics' outcome label (interface.md), and the log line's status
    event: str  # the metrics' event label: "" until the signature and the header check out
    fields: dict[str, str]  # the log line's: delivery, repo, event, action, reason
    error: BaseException | None = None  # a bug met on the way: logged with its traceback


def _refused(status: int, why: str, outcome: str, event: str, sent: dict[str, str]) -> _Answer:
    return _Answer(_error(status, why), outcome, event, {**sent, "reason": why})


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


def _fields(d: NewDelivery, reason: str) -> dict[str, str]:
    """The log line's fields for a delivery that was read."""
    return {
        "delivery": d.guid,
        "repo": d.repo,
        "event": d.github_event,
        "action": d.action,
        "reason": reason,
    }
