"""Failure reports: commit statuses against the fake GitHub and a real SQLite queue."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from bridge.config import GitHubConfig, Secret
from bridge.github import GitHubService
from bridge.github.api import GitHubClient
from bridge.github.auth import Auth
from bridge.github.statuses import StatusReporter, commit_of, failure_status
from bridge.queue import Attempt, ClaimedJob, NewDelivery, NewJob, Queue, Settlement, open_queue
from bridge.states import JobState
from tests.fakes.github import TOKEN, Failure, FakeGitHub, app_config

T = TypeVar("T")
REPO = "octo-org/web.app"


class Harness:
    """A real queue, a reporter on the fake GitHub, and the forwarder's part played by hand."""

    def __init__(self, queue: Queue, reporter: StatusReporter) -> None:
        self.queue = queue
        self.reporter = reporter
        self.waits: list[float] = []

    async def deliver(
        self,
        *,
        installation: int | None = 1,
        sha: str | None = None,
        endpoint: str = "builds",
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Store a delivery with one job; its GUID and commit."""
        guid, sha = str(uuid.uuid4()), sha or uuid.uuid4().hex + "00000000"
        payload: dict[str, Any] = {"repository": {"full_name": REPO}, **(extra or {})}
        if installation is not None:
            payload["installation"] = {"id": installation}
        body = {"commit": sha, "event": "push"} if endpoint == "builds" else {"ref": "main"}
        await self.queue.add(
            NewDelivery(
                guid=guid,
                github_event="push",
                action="",
                repo=REPO,
                event="push",
                summary={"commit": sha if endpoint == "builds" else ""},
                payload=json.dumps(payload).encode(),
                skip=None,
                jobs=(
                    NewJob(
                        endpoint,
                        "octo-org",
                        "web.app",
                        f"/api/v1/repos/{REPO}/{endpoint}",
                        json.dumps(body).encode(),
                        f"lane-{guid}",
                    ),
                ),
                received_at=time.time() - 1,
            )
        )
        return guid, sha

    async def settle(self, guid: str, state: JobState, *, error: str = "", link: str = "") -> None:
        """Claim the delivery's job, settle it as ``state`` and tell the reporter."""
        job = await self._claim(guid)
        attempt = Attempt(time.time(), 0.01, 422 if state == JobState.FAILURE else 201, error, "")
        settlement = Settlement(state, attempt, error=error, vela_link=link)
        await self.queue.settle(job.id, settlement, time.time())
        self.reporter.on_settled(job, settlement)
        await self.reporter.idle()

    async def restart(self, guid: str) -> None:
        record = await self.queue.delivery(guid)
        assert record is not None and record.number is not None
        await self.queue.restart(REPO, record.number, lambda event, raw: "unused", time.time())

    async def _claim(self, guid: str) -> ClaimedJob:
        for _ in range(100):
            for job in await self.queue.claim(100, time.time() + 1):
                if job.guid == guid:
                    return job
                await self.queue.release([job.id], time.time())
            await asyncio.sleep(0.01)
        raise AssertionError(f"no job of {guid} to claim")


def reporting(
    tmp_path: Path,
    config: GitHubConfig,
    main: Callable[[Harness], Awaitable[T]],
    **options: Any,
) -> T:
    async def go() -> T:
        queue = await open_queue(
            f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=60, retention_days=14
        )
        try:
            async with aiohttp.ClientSession() as session:
                client = GitHubClient(session, config.api_url)
                waits: list[float] = []

                async def sleep(seconds: float) -> None:
                    waits.append(seconds)

                reporter = StatusReporter(
                    queue, client, Auth(config, client), sleep=sleep, **options
                )
                harness = Harness(queue, reporter)
                harness.waits = waits
                return await main(harness)
        finally:
            await queue.close()

    return asyncio.run(go())


def reports(config_fake: FakeGitHub, **overrides: Any) -> GitHubConfig:
    return app_config(config_fake, report_failures=True, **overrides)


def test_a_failure_sets_one_error_status_on_its_commit(github: FakeGitHub, tmp_path: Path) -> None:
    async def main(h: Harness) -> str:
        guid, sha = await h.deliver(installation=77)
        await h.settle(guid, JobState.FAILURE, error="Vela answered 422: invalid pipeline")
        return sha

    sha = reporting(tmp_path, reports(github), main)
    assert github.statuses == [
        {
            "repo": REPO,
            "sha": sha,
            "state": "error",
            "description": "Could not be handed to Vela: Vela answered 422: invalid pipeline",
            "target_url": None,
            "context": "vela-bridge",
            "installation": 77,  # the delivery's installation token
        }
    ]
    assert github.rejected == []


def test_skipped_and_successful_deliveries_set_no_status(
    github: FakeGitHub, tmp_path: Path
) -> None:
    async def main(h: Harness) -> None:
        skipped, _ = await h.deliver()
        await h.settle(skipped, JobState.SKIPPED, error="the repository has push disabled")
        fine, _ = await h.deliver()
        await h.settle(fine, JobState.SUCCESS, link="http://vela/octo-org/web.app/1")

    reporting(tmp_path, reports(github), main)
    assert github.statuses == []
    assert github.requests == []  # not even an installation token


def test_one_status_per_state_change_and_success_with_the_link_after_a_restart(
    github: FakeGitHub, tmp_path: Path
) -> None:
    link = "http://vela.example/octo-org/web.app/42"

    async def main(h: Harness) -> str:
        guid, sha = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="gave up after 25 attempts: 502")
        h.reporter.on_settled(*await _same_failure(h, guid))  # the same state again
        await h.reporter.idle()
        await h.restart(guid)
        await h.settle(guid, JobState.SUCCESS, link=link)
        await h.restart(guid)  # restarted again: success → success is no change
        await h.settle(guid, JobState.SUCCESS, link=link + "0")
        await h.restart(guid)
        await h.settle(guid, JobState.FAILURE, error="Vela answered 404: no such repo")
        return sha

    sha = reporting(tmp_path, reports(github), main)
    assert [(s["state"], s["target_url"], s["sha"]) for s in github.statuses] == [
        ("error", None, sha),
        ("success", link, sha),
        ("error", None, sha),
    ]
    assert github.statuses[1]["description"] == "Handed to Vela after a restart"
    assert github.statuses[2]["description"].endswith("no such repo")


async def _same_failure(h: Harness, guid: str) -> tuple[ClaimedJob, Settlement]:
    record = await h.queue.delivery(guid)
    assert record is not None
    job = ClaimedJob(
        id=record.jobs[0].id,
        guid=guid,
        number=1,
        endpoint="builds",
        org="octo-org",
        repo="web.app",
        path="",
        body=b"{}",
        attempts=1,
        first_attempt_at=None,
        unclear=False,
        github_event="push",
        action="",
    )
    return job, Settlement(JobState.FAILURE, None, error="again")


def test_a_restart_of_a_delivery_that_never_failed_reports_nothing(
    github: FakeGitHub, tmp_path: Path
) -> None:
    async def main(h: Harness) -> None:
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.SKIPPED, error="nothing to run")
        await h.restart(guid)
        await h.settle(guid, JobState.SUCCESS, link="http://vela/1")
        await h.restart(guid)
        await h.settle(guid, JobState.FAILURE, error="now it fails")

    reporting(tmp_path, reports(github), main)
    assert [s["state"] for s in github.statuses] == ["error"]


def test_descriptions_stay_within_140_characters(github: FakeGitHub, tmp_path: Path) -> None:
    async def main(h: Harness) -> None:
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="Vela answered 422:\n" + "x" * 500)

    reporting(tmp_path, reports(github), main)
    (status,) = github.statuses
    assert len(status["description"]) == 140 and status["description"].endswith("x…")
    assert len(failure_status("").description) <= 140


def test_installation_tokens_are_cached_until_shortly_before_expiry(
    github: FakeGitHub, tmp_path: Path
) -> None:
    async def main(h: Harness) -> None:
        for installation in (1, 1, 2, 1):
            guid, _ = await h.deliver(installation=installation)
            await h.settle(guid, JobState.FAILURE, error="no")

    reporting(tmp_path, reports(github), main)
    assert [s["installation"] for s in github.statuses] == [1, 1, 2, 1]
    minted = [r.path for r in github.requests if r.path.endswith("/access_tokens")]
    assert minted == ["/app/installations/1/access_tokens", "/app/installations/2/access_tokens"]

    github.reset()
    github.token_lifetime = 200  # inside the five-minute renewal margin: always renewed
    try:
        reporting(tmp_path, reports(github), main)
    finally:
        github.token_lifetime = 3600
    assert sum(r.path.endswith("/access_tokens") for r in github.requests) == 4


def test_token_mode_uses_the_token(github: FakeGitHub, tmp_path: Path) -> None:
    config = GitHubConfig(
        webhook_secrets=(Secret("s"),),
        api_url=github.url,
        token=Secret(TOKEN),
        report_failures=True,
    )

    async def main(h: Harness) -> None:
        guid, _ = await h.deliver(installation=5)
        await h.settle(guid, JobState.FAILURE, error="no")

    reporting(tmp_path, config, main)
    assert [(s["state"], s["installation"]) for s in github.statuses] == [("error", None)]
    assert all(r.headers["Authorization"] == f"token {TOKEN}" for r in github.requests)


def test_deployment_api_jobs_report_on_the_deployment_sha(
    github: FakeGitHub, tmp_path: Path
) -> None:
    async def main(h: Harness) -> None:
        guid, _ = await h.deliver(
            endpoint="deployments", extra={"deployment": {"sha": "d" * 40, "id": 9}}
        )
        await h.settle(guid, JobState.FAILURE, error="no")

    reporting(tmp_path, reports(github), main)
    assert [s["sha"] for s in github.statuses] == ["d" * 40]


def test_transient_errors_are_tried_a_few_times_with_backoff(
    github: FakeGitHub, tmp_path: Path
) -> None:
    github.fail_next(Failure(502, count=2, path="/statuses/"))

    async def main(h: Harness) -> list[float]:
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="no")
        return h.waits

    waits = reporting(tmp_path, reports(github), main)
    assert [s["state"] for s in github.statuses] == ["error"]
    assert waits == [1.0, 2.0]


def test_a_status_that_cannot_be_posted_is_dropped_after_a_few_tries(
    github: FakeGitHub, tmp_path: Path
) -> None:
    github.fail_next(Failure(503, count=10, path="/statuses/"))

    async def main(h: Harness) -> None:
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="no")

    reporting(tmp_path, reports(github), main)
    assert github.statuses == []
    assert sum("/statuses/" in r.path for r in github.requests) == 3


@pytest.mark.parametrize("status", [404, 422])
def test_refusals_are_not_retried(github: FakeGitHub, tmp_path: Path, status: int) -> None:
    github.fail_next(Failure(status, body={"message": "Not Found"}, count=5, path="/statuses/"))

    async def main(h: Harness) -> None:
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="no")

    reporting(tmp_path, reports(github), main)
    assert sum("/statuses/" in r.path for r in github.requests) == 1


def test_rate_limits_wait_as_asked_or_drop_the_status(github: FakeGitHub, tmp_path: Path) -> None:
    github.fail_next(Failure(429, {"Retry-After": "7"}, path="/statuses/"))

    async def main(h: Harness) -> list[float]:
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="no")
        github.fail_next(Failure(429, {"Retry-After": "3600"}, path="/statuses/"))
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="no")
        return h.waits

    waits = reporting(tmp_path, reports(github), main)
    assert waits == [7.0]
    assert len(github.statuses) == 1


def test_a_revoked_installation_token_is_replaced(github: FakeGitHub, tmp_path: Path) -> None:
    async def main(h: Harness) -> None:
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="no")
        github.tokens.clear()  # GitHub forgot every token it issued
        guid, _ = await h.deliver()
        await h.settle(guid, JobState.FAILURE, error="no")

    reporting(tmp_path, reports(github), main)
    assert len(github.statuses) == 2
    assert sum(r.path.endswith("/access_tokens") for r in github.requests) == 2


def test_reporting_never_holds_up_the_forwarder(tmp_path: Path) -> None:
    """A GitHub that accepts connections and never answers: on_settled still returns at once."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        config = GitHubConfig(
            webhook_secrets=(Secret("s"),),
            api_url=f"http://127.0.0.1:{hole.getsockname()[1]}",
            token=Secret(TOKEN),
            report_failures=True,
        )

        async def go() -> tuple[float, float]:
            queue = await open_queue(
                f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=60, retention_days=14
            )
            try:
                async with aiohttp.ClientSession() as session:
                    client = GitHubClient(session, config.api_url)
                    reporter = StatusReporter(queue, client, Auth(config, client))
                    service = GitHubService(reporter=reporter)
                    h = Harness(queue, reporter)
                    guid, _ = await h.deliver()
                    job = await h._claim(guid)
                    failure = Settlement(JobState.FAILURE, None, error="no")
                    await queue.settle(job.id, failure, time.time())
                    started = time.monotonic()
                    await service.on_settled(job, failure)
                    returned = time.monotonic() - started
                    await asyncio.sleep(0.2)
                    started = time.monotonic()
                    await service.close(grace=0.1)
                    return returned, time.monotonic() - started
            finally:
                await queue.close()

        returned, closed = asyncio.run(go())
    assert returned < 0.05
    assert closed < 1.0


@pytest.mark.parametrize(
    ("body", "summary", "payload", "sha"),
    [
        (b'{"commit": "abc"}', {"commit": "def"}, {}, "abc"),
        (b'{"ref": "main"}', {"commit": "def"}, {}, "def"),
        (b'{"ref": "main"}', {}, {"deployment": {"sha": "ghi"}}, "ghi"),
        (b"{}", {}, {"pull_request": {"head": {"sha": "jkl"}}}, "jkl"),
        (b"not json", {}, {"after": "mno"}, "mno"),
        (b"{}", {}, {}, ""),
    ],
)
def test_commit_of(body: bytes, summary: dict[str, Any], payload: dict[str, Any], sha: str) -> None:
    assert commit_of(body, summary, payload) == sha
