"""The Vela API client: one pooled keep-alive session, answers turned into records.

:func:`classify` is the rule of interface.md "Forwarding to Vela": which answers
are a success, one of Vela's own skips, worth retrying, a token problem, or final.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from bridge import __version__
from bridge.config import Secret, redirect_target
from bridge.errors import ForwardError, Rejected, Retryable, Unauthorized

USER_AGENT = f"vela-bridge/{__version__}"
_EXCERPT = 300
# Seconds a Vela server's clock may run behind ours when comparing creation times.
_CLOCK_SLACK = 5.0
# The token's own user (api-spec.json, GetCurrentUser): a cheap authenticated GET that
# needs no repository, to ask whether Vela takes the token.
USER_PATH = "/api/v1/user"


@dataclass(frozen=True, slots=True)
class Accepted:
    """Vela created the build (or deployment): its number and, when it gave one, its link."""

    status: int
    excerpt: str
    number: int | None = None
    link: str = ""


@dataclass(frozen=True, slots=True)
class Skipped:
    """Vela had nothing to run, or the repository does not have the event enabled."""

    status: int
    excerpt: str
    reason: str


Answer = Accepted | Skipped


def classify(status: int, text: str, retry_after: str | None = None, *, now: float = 0.0) -> Answer:
    """Turn one HTTP answer of Vela into an Answer, or raise the ForwardError it means."""
    excerpt = _excerpt(text)
    data: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(text) if text else None
    if 200 <= status < 300:
        if isinstance(data, str):  # Vela's "nothing to run" answer is a bare JSON string
            return Skipped(status, excerpt, reason=data)
        if not isinstance(data, dict):
            # Not Vela's answer (a proxy's login page, an empty body): nothing says a build
            # exists, nor that none does. Unclear: the next attempt looks before re-sending.
            raise Retryable(
                f"Vela answered {status} without a build: {excerpt or 'an empty body'}",
                status_code=status,
                body=excerpt,
            )
        number, link = data.get("number"), data.get("link")
        return Accepted(
            status,
            excerpt,
            number=number if isinstance(number, int) and not isinstance(number, bool) else None,
            link=link if isinstance(link, str) else "",
        )
    message = _error_text(data, excerpt) or f"HTTP {status}"
    if status == 400 and "does not have" in message and "enabled" in message:
        return Skipped(status, excerpt, reason=message)
    if status in (401, 403):
        raise Unauthorized(f"Vela refused the token: {message}", status_code=status, body=excerpt)
    if status in (408, 429) or status >= 500:
        raise Retryable(
            f"Vela answered {status}: {message}",
            status_code=status,
            body=excerpt,
            retry_after=parse_retry_after(retry_after, now or time.time()),
            # Any 5xx may come after the build was made: Vela's own 500 (its queue publish
            # failed), or a gateway's answer once it had passed the request on (502, 504,
            # Envoy's 503 "upstream reset", Cloudflare's 524): look before re-sending.
            # 408 and 429 say the request was not taken up.
            sent=status >= 500,
        )
    raise Rejected(f"Vela rejected it: {message}", status_code=status, body=excerpt)


def _redirected(status: int, location: str) -> Retryable:
    """A redirect is not followed (aiohttp would turn the POST into a GET): the request was
    not handled, and vela.url is likely not the address Vela answers on."""
    return Retryable(
        f"Vela answered {status}, a redirect to {redirect_target(location)}: set vela.url to the"
        " address Vela answers on",
        status_code=status,
        sent=False,
    )


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" dates: HTTP dates are GMT, not local time
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)


def _error_text(data: Any, excerpt: str) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return excerpt


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT else flat[: _EXCERPT - 1] + "…"


def builds_path(org: str, repo: str) -> str:
    """Vela's build-create and build-list path for a repository (seed 000)."""
    return f"/api/v1/repos/{quote(org, safe='')}/{quote(repo, safe='')}/builds"


def _repo_path(collection: str, org: str, repo: str) -> str:
    return f"/api/v1/{collection}/{quote(org, safe='')}/{quote(repo, safe='')}"


def _same_build(build: Mapping[str, Any], body: Mapping[str, Any], since: float) -> bool:
    """Whether Vela's ``build`` (same commit and event) is the one ``body`` asked for, made
    since ``since``. What an older Vela leaves out or empty is not held against it."""
    if any(build.get(k) != body.get(k) for k in ("source", "ref") if k in body):
        return False
    action = build.get("event_action")
    if action and "event_action" in body and action != body["event_action"]:
        return False
    return _made_since(build.get("created"), since) is not False


def _made_since(created: Any, since: float) -> bool | None:
    """Whether a Vela creation time (Unix seconds) is ``since`` or later; None when Vela
    gave none."""
    if not isinstance(created, int | float) or isinstance(created, bool) or created <= 0:
        return None
    return created >= since - _CLOCK_SLACK


def _json_list(text: str, status: int) -> list[dict[str, Any]]:
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise Retryable("Vela's list is not JSON", status_code=status) from None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


class VelaClient:
    """Talks to one Vela server; ``send`` and ``find_build`` raise ForwardError subclasses."""

    def __init__(self, url: str, token: Secret, *, timeout: float, connections: int) -> None:
        self._url = url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {token.value}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        # Called on every answer that shows Vela took the token: a 2xx in JSON (Vela's
        # own; a proxy's sign-in page is not one), whatever the request. The forwarder
        # ends a pause on a refused token with it (interface.md "Forwarding to Vela").
        self.on_authorized: Callable[[], None] | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def url(self) -> str:
        return self._url

    async def send(self, path: str, body: bytes, guid: str) -> Answer:
        status, text, retry_after = await self._request(
            "POST", path, data=body, headers={"X-GitHub-Delivery": guid}
        )
        return classify(status, text, retry_after)

    async def deployment_exists(self, org: str, repo: str, number: int) -> bool:
        """Whether Vela knows GitHub deployment ``number`` (it made it: UI, CLI or API)."""
        path = f"{_repo_path('deployments', org, repo)}/{number}"
        status, text, retry_after = await self._request("GET", path)
        if status == 404:
            return False
        classify(status, text, retry_after)  # raises for every other non-2xx
        return True

    async def find_deployment(
        self, org: str, repo: str, body: Mapping[str, Any], since: float
    ) -> Accepted | None:
        """The deployment an earlier unclear request created: same fields, made since then."""
        path = _repo_path("deployments", org, repo)
        status, text, retry_after = await self._request("GET", path)
        if not 200 <= status < 300:
            classify(status, text, retry_after)
        for item in _json_list(text, status):
            recent = _made_since(item.get("created_at"), since)
            if recent and all(item.get(k) == v for k, v in body.items()):
                number = item.get("number")
                return Accepted(status, "", number=number if isinstance(number, int) else None)
        return None

    async def find_build(
        self, org: str, repo: str, body: Mapping[str, Any], since: float = 0.0
    ) -> Accepted | None:
        """Vela's build for this request, if an earlier unclear attempt (made no earlier
        than ``since``) created one.

        interface.md: ``GET …/builds?commit=<sha>&event=<event>``, matching on
        ``source`` and ``ref`` too; and, where Vela's build says them, on the action (a
        pull request's ``labeled`` build has its ``opened`` build's commit) and on being
        created since (a commit pushed again later has its earlier build).
        """
        params = {"commit": str(body.get("commit", "")), "event": str(body.get("event", ""))}
        status, text, retry_after = await self._request(
            "GET", builds_path(org, repo), params=params
        )
        if status == 404:
            return None
        if not 200 <= status < 300:
            classify(status, text, retry_after)  # raises for every non-2xx
        for build in _json_list(text, status):
            if _same_build(build, body, since):
                answer = classify(status, orjson.dumps(build).decode())
                if isinstance(answer, Accepted):
                    return answer
        return None

    async def check_token(self) -> None:
        """Whether Vela takes the token, asked with no job at hand: ``GET /api/v1/user``.

        Returns on a 2xx with a user; raises Unauthorized on 401/403, and another
        ForwardError for any other answer or failure (it tells neither way).
        """
        status, text, retry_after = await self._request("GET", USER_PATH)
        if 200 <= status < 300:
            with contextlib.suppress(orjson.JSONDecodeError):
                if isinstance(orjson.loads(text), dict):
                    return
            raise Retryable(
                f"Vela answered {status} without a user: {_excerpt(text) or 'an empty body'}",
                status_code=status,
            )
        if status in (401, 403):
            classify(status, text, retry_after)  # raises Unauthorized, with Vela's error
        excerpt = _excerpt(text)
        raise Retryable(f"Vela answered {status}: {excerpt}", status_code=status, body=excerpt)

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, str, str | None]:
        assert self._session is not None, "VelaClient.open() was not awaited"
        try:
            async with self._session.request(
                method, self._url + path, allow_redirects=False, **kwargs
            ) as response:
                text = await response.text(errors="replace")
                if 300 <= response.status < 400:
                    raise _redirected(response.status, response.headers.get("Location", ""))
                if (
                    200 <= response.status < 300
                    and response.content_type == "application/json"
                    and self.on_authorized is not None
                ):
                    self.on_authorized()
                return response.status, text, response.headers.get("Retry-After")
        except aiohttp.ClientConnectorError as exc:
            raise Retryable(f"cannot connect to Vela: {exc.os_error}", sent=False) from None
        except TimeoutError:
            raise Retryable("Vela did not answer in time") from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise Retryable(f"connection to Vela failed: {type(exc).__name__}") from None


__all__ = ["Accepted", "Answer", "ForwardError", "Skipped", "VelaClient", "classify"]
