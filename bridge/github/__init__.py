"""Talking back to GitHub (spec/github.md): the catch-up sweep and failure reports.

Both are optional and off without credentials. The modules follow the flow:

    api.py       the few GitHub REST calls, through gidgethub's aiohttp backend;
                 failures become the errors below, rate limits carry .retry_after
    auth.py      the App's JWT and installation tokens (cached), or the plain token
    sweep.py     list the hook's recent deliveries, ask GitHub to redeliver the
                 ones the bridge never stored (one replica at a time)
    statuses.py  a commit status "error" when a delivery ends in failure, and
                 "success" when a restart later gets it to Vela

:func:`problems` is the config check (``github.<key>: …`` lines, never a secret);
:func:`start` opens it all inside the app's lifespan and returns a
:class:`GitHubService` whose ``on_settled`` the forwarder calls.

Errors (under :class:`bridge.errors.BridgeError`):

    GitHubError        a GitHub API call did not succeed; .status_code (None when
    │                  GitHub could not be reached)
    └── RateLimited    403/429 with Retry-After or an exhausted X-RateLimit-Remaining;
                       .retry_after in seconds
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bridge.errors import BridgeError, ConfigError

if TYPE_CHECKING:
    import aiohttp

    from bridge.config import GitHubConfig
    from bridge.github.statuses import StatusReporter
    from bridge.github.sweep import Sweeper
    from bridge.queue import ClaimedJob, Queue, Settlement

log = logging.getLogger("bridge.github")

# uvicorn binds its socket only after the lifespan has started: the first sweep waits
# a moment, so that the redeliveries it asks for find the bridge listening.
FIRST_SWEEP_DELAY_SECONDS = 1.0
_REQUEST_TIMEOUT_SECONDS = 30.0


class GitHubError(BridgeError):
    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class RateLimited(GitHubError):
    def __init__(self, message: str, *, retry_after: float, status_code: int | None = None):
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


def problems(config: GitHubConfig) -> list[str]:
    """The ``github.<key>: …`` lines for credentials that cannot work; [] when fine."""
    from bridge.github.auth import KeyProblem, read_private_key

    found: list[str] = []
    has_key = bool(config.private_key_file) or config.private_key is not None
    if config.private_key_file and config.private_key is not None:
        found.append("github.private_key: give private_key or private_key_file, not both")
    elif has_key:
        try:
            read_private_key(config)
        except KeyProblem as exc:
            found.append(str(exc))
    if config.app_id is not None and not has_key:
        found.append("github.app_id: needs github.private_key_file or github.private_key")
    if has_key and config.app_id is None:
        key = "private_key_file" if config.private_key_file else "private_key"
        found.append(f"github.{key}: needs github.app_id")
    if config.hooks and config.token is None:
        found.append("github.hooks: need github.token (hooks are watched in token mode)")
    app = config.app_id is not None and has_key
    if config.redeliver and not (app or (config.token is not None and config.hooks)):
        found.append(
            "github.redeliver: needs a GitHub App (app_id and a private key)"
            " or github.token with [[github.hooks]]"
        )
    if config.report_failures and not (app or config.token is not None):
        found.append(
            "github.report_failures: needs a GitHub App (app_id and a private key) or github.token"
        )
    return found


class GitHubService:
    """What the lifespan holds: the sweep (if on), the reporter (if on), their session."""

    def __init__(
        self,
        sweeper: Sweeper | None = None,
        reporter: StatusReporter | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.sweeper = sweeper
        self.reporter = reporter
        self._owned_session = session

    async def on_settled(self, job: ClaimedJob, settlement: Settlement) -> None:
        """The forwarder's settle hook: returns at once, reporting runs in the background."""
        if self.reporter is not None:
            self.reporter.on_settled(job, settlement)

    async def close(self, grace: float = 5.0) -> None:
        """Stop sweeping, give pending reports ``grace`` s, close what :func:`start` opened."""
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self.reporter is not None:
            await self.reporter.stop(grace)
        if self._owned_session is not None:
            await self._owned_session.close()


def start(
    config: GitHubConfig,
    queue: Queue,
    session: aiohttp.ClientSession | None = None,
    *,
    first_sweep_delay: float = FIRST_SWEEP_DELAY_SECONDS,
) -> GitHubService:
    """Open what ``config`` turns on; call inside the running event loop (the lifespan).

    Without ``session`` one is created (and closed by ``close()``). Raises ConfigError
    with the :func:`problems` lines when the credentials cannot work.
    """
    from bridge.github import sweep  # its counters are on /metrics even while it is off

    if not (config.redeliver or config.report_failures):
        return GitHubService()
    found = problems(config)
    if found:
        raise ConfigError(found)

    import aiohttp

    from bridge.github.api import GitHubClient
    from bridge.github.auth import Auth
    from bridge.github.statuses import StatusReporter

    owned = None
    if session is None:
        session = owned = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_SECONDS)
        )
    client = GitHubClient(session, config.api_url)
    auth = Auth(config, client)
    sweeper = reporter = None
    if config.redeliver:
        sweeper = sweep.Sweeper(config, queue, client, auth)
        sweeper.start(first_sweep_delay)
    if config.report_failures:
        reporter = StatusReporter(queue, client, auth)
    log.info(
        "talking back to GitHub at %s: catch-up sweep %s, failure reports %s",
        config.api_url,
        "on" if sweeper else "off",
        "on" if reporter else "off",
        extra={"mode": auth.mode},
    )
    return GitHubService(sweeper, reporter, owned)
