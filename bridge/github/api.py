"""The GitHub REST calls the bridge makes, through gidgethub's aiohttp backend.

    GET  {hook}/deliveries                  a webhook's recent deliveries, newest first,
                                            paged by cursor (Link rel="next")
    POST {hook}/deliveries/{id}/attempts    redeliver one (202)
    POST /app/installations/{id}/access_tokens   an installation token (App JWT)
    POST /repos/{owner}/{repo}/statuses/{sha}     a commit status

``{hook}`` is ``/app/hook`` (App, with the JWT), ``/repos/{owner}/{repo}/hooks/{id}`` or
``/orgs/{org}/hooks/{id}`` (token mode). Docs: "REST API endpoints for webhooks",
"… for commit statuses", "Rate limits for the REST API". Every failure becomes a
:class:`~bridge.github.GitHubError`; a rate limit (403/429 with ``Retry-After``, an
exhausted ``X-RateLimit-Remaining`` or a secondary-limit message) becomes
:class:`~bridge.github.RateLimited` with the wait GitHub asks for. Calls are never
retried here: the callers decide (the sweep waits for its next turn).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import gidgethub
import gidgethub.aiohttp
import gidgethub.apps

from bridge import __version__
from bridge.config import GitHubHook
from bridge.github import GitHubError, RateLimited
from bridge.vela import parse_retry_after

PER_PAGE = 100
MAX_RETRY_AFTER_SECONDS = 3600.0  # a primary limit resets within the hour
_SECONDARY_WAIT_SECONDS = 60.0  # docs: "wait at least one minute" when no header says


@dataclass(frozen=True, slots=True)
class Credential:
    """A JWT or token for the Authorization header; its value never shows in a repr."""

    kind: Literal["jwt", "token"]
    value: str = field(repr=False)
    bucket: str  # whose rate limit it spends: "app", "installation 42", "token"


@dataclass(frozen=True, slots=True)
class Hook:
    """A webhook whose deliveries can be listed and redelivered."""

    path: str  # "/app/hook", "/repos/o/r/hooks/1" or "/orgs/o/hooks/1"
    label: str  # for logs: "app hook", "repo o/r hook 1"

    @classmethod
    def app(cls) -> Hook:
        return cls("/app/hook", "app hook")

    @classmethod
    def configured(cls, hook: GitHubHook) -> Hook:
        if hook.repo:
            owner, _, name = hook.repo.partition("/")
            path = f"/repos/{_seg(owner)}/{_seg(name)}/hooks/{hook.hook_id}"
            return cls(path, f"repo {hook.repo} hook {hook.hook_id}")
        return cls(
            f"/orgs/{_seg(hook.org)}/hooks/{hook.hook_id}", f"org {hook.org} hook {hook.hook_id}"
        )


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One entry of a hook's delivery list: GitHub lists every attempt separately."""

    id: int
    guid: str
    status_code: int  # 0: no answer (connection refused, timeout)
    delivered_at: float  # Unix seconds
    redelivery: bool
    event: str


@dataclass(frozen=True, slots=True)
class CommitStatus:
    state: Literal["error", "failure", "pending", "success"]
    description: str
    target_url: str = ""
    context: str = "vela-bridge"


class _API(gidgethub.aiohttp.GitHubAPI):
    """gidgethub's client, refusing to spend a rate limit GitHub said is exhausted."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, clock: Callable[[], float]):
        super().__init__(session, f"vela-bridge/{__version__}", base_url=base_url)
        self._clock = clock

    async def manage_rate_limit(self, *, method: str, url: str) -> None:
        limit = self.rate_limit
        # gidgethub counts this request down before asking: below 0 means none was left.
        if limit is not None and limit.remaining < 0:
            wait = limit.reset_datetime.timestamp() - self._clock()
            if wait > 0:
                raise RateLimited(
                    "GitHub's rate limit is spent until it resets",
                    retry_after=min(wait, MAX_RETRY_AFTER_SECONDS),
                )


class GitHubClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._api_url = api_url
        self._clock = clock
        self._apis: dict[str, _API] = {}

    def _api(self, credential: Credential) -> _API:
        api = self._apis.get(credential.bucket)
        if api is None:
            api = self._apis[credential.bucket] = _API(self._session, self._api_url, self._clock)
        return api

    async def deliveries(
        self, hook: Hook, credential: Credential, since: float, *, limit: int = 20_000
    ) -> AsyncIterator[DeliveryAttempt]:
        """The hook's attempts delivered at or after ``since``, newest first, paging on.

        Stops at the first older entry (the list is newest first) or after ``limit``.
        """
        url = f"{hook.path}/deliveries?per_page={PER_PAGE}"
        seen = 0
        async with _translated(f"listing the deliveries of the {hook.label}", self._clock):
            items = self._api(credential).getiter(
                url, jwt=_jwt(credential), oauth_token=_token(credential)
            )
            async with contextlib.aclosing(items):
                async for item in items:
                    attempt = _attempt(item)
                    if attempt is None:
                        continue
                    if attempt.delivered_at < since or seen >= limit:
                        return
                    seen += 1
                    yield attempt

    async def redeliver(self, hook: Hook, delivery_id: int, credential: Credential) -> None:
        url = f"{hook.path}/deliveries/{delivery_id}/attempts"
        async with _translated(f"redelivering {delivery_id} of the {hook.label}", self._clock):
            await self._api(credential).post(
                url, data=b"", jwt=_jwt(credential), oauth_token=_token(credential)
            )

    async def create_status(
        self, repo: str, sha: str, status: CommitStatus, credential: Credential
    ) -> None:
        owner, _, name = repo.partition("/")
        url = f"/repos/{_seg(owner)}/{_seg(name)}/statuses/{_seg(sha)}"
        data: dict[str, str] = {
            "state": status.state,
            "context": status.context,
            "description": status.description,
        }
        if status.target_url:
            data["target_url"] = status.target_url
        async with _translated(f"setting the commit status of {repo}@{sha[:12]}", self._clock):
            await self._api(credential).post(
                url, data=data, jwt=_jwt(credential), oauth_token=_token(credential)
            )

    async def installation_token(
        self, installation_id: int, app_id: int, private_key: str
    ) -> tuple[str, float]:
        """A new installation token and when it expires (Unix seconds)."""
        what = f"getting a token for installation {installation_id}"
        async with _translated(what, self._clock):
            answer = await gidgethub.apps.get_installation_access_token(
                self._api(Credential("jwt", "", "app")),
                installation_id=str(installation_id),
                app_id=str(app_id),
                private_key=private_key,
            )
        token = answer.get("token")
        expires = _timestamp(answer.get("expires_at"))
        if not isinstance(token, str) or not token or expires is None:
            raise GitHubError(f"{what}: GitHub's answer has no token or expiry")
        return token, expires


def _jwt(credential: Credential) -> str | None:
    return credential.value if credential.kind == "jwt" else None


def _token(credential: Credential) -> str | None:
    return credential.value if credential.kind == "token" else None


def _seg(text: str) -> str:
    return quote(text, safe="")


def _attempt(item: Any) -> DeliveryAttempt | None:
    """An entry of the list, or None when it lacks what the sweep needs."""
    if not isinstance(item, Mapping):
        return None
    ident, guid, code = item.get("id"), item.get("guid"), item.get("status_code")
    delivered = _timestamp(item.get("delivered_at"))
    if not (isinstance(ident, int) and isinstance(guid, str) and guid and delivered is not None):
        return None
    return DeliveryAttempt(
        id=ident,
        guid=guid,
        status_code=code if isinstance(code, int) and not isinstance(code, bool) else 0,
        delivered_at=delivered,
        redelivery=item.get("redelivery") is True,
        event=str(item.get("event") or ""),
    )


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@contextlib.asynccontextmanager
async def _translated(what: str, clock: Callable[[], float]) -> AsyncIterator[None]:
    """Turn what gidgethub and aiohttp raise into GitHubError / RateLimited."""
    try:
        yield
    except gidgethub.HTTPException as exc:
        status = int(exc.status_code)
        message = f"{what}: GitHub answered {status} {exc}"
        wait = retry_after(status, exc.headers, str(exc), clock())
        if wait is not None:
            raise RateLimited(message, retry_after=wait, status_code=status) from None
        raise GitHubError(message, status_code=status) from None
    except gidgethub.GitHubException as exc:
        raise GitHubError(f"{what}: {exc.__class__.__name__}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = exc.__class__.__name__
        raise GitHubError(f"{what}: GitHub cannot be reached ({reason})") from None
    except ValueError:  # a body that claims to be JSON and is not
        raise GitHubError(f"{what}: GitHub's answer is not readable") from None


def retry_after(status: int, headers: Mapping[str, str], message: str, now: float) -> float | None:
    """Seconds to wait before calling again when ``status`` is a rate limit, else None."""
    if status not in (403, 429):
        return None
    wait: float | None = None
    header = headers.get("retry-after") or headers.get("Retry-After")
    if header:
        wait = parse_retry_after(header, now)  # seconds, or an HTTP date (GMT when zoneless)
    remaining = headers.get("x-ratelimit-remaining") or headers.get("X-RateLimit-Remaining")
    reset = headers.get("x-ratelimit-reset") or headers.get("X-RateLimit-Reset")
    if wait is None and remaining == "0" and reset:
        with contextlib.suppress(ValueError):
            wait = float(reset) - now
    if wait is None and (status == 429 or "rate limit" in message.lower()):
        wait = _SECONDARY_WAIT_SECONDS
    if wait is None:
        return None  # a 403 that is a permission problem, not a limit
    return min(max(wait, 1.0), MAX_RETRY_AFTER_SECONDS)
