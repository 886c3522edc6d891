"""The catch-up sweep against the fake GitHub and a real SQLite queue."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from prometheus_client import REGISTRY

from bridge.config import GitHubConfig, GitHubHook, Secret
from bridge.github.api import DeliveryAttempt, GitHubClient
from bridge.github.auth import Auth
from bridge.github.sweep import LEASE_NAME, Sweeper, failed
from bridge.queue import NewDelivery, Queue, open_queue
from tests.fakes.github import (
    TOKEN,
    Failure,
    FakeGitHub,
    app_config,
    app_key,
    new_key,
    org_hook,
    repo_hook,
)
from tests.fakes.vela import _free_port

T = TypeVar("T")
HOUR = 3600.0


@asynccontextmanager
async def opened(tmp_path: Path) -> AsyncIterator[Queue]:
    queue = await open_queue(f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=60, retention_days=14)
    try:
        yield queue
    finally:
        await queue.close()


def sweeping(
    tmp_path: Path,
    config: GitHubConfig,
    main: Callable[[Callable[..., Sweeper], Queue], Awaitable[T]],
) -> T:
    """Run ``main(make_sweeper, queue)`` with a real queue and an aiohttp session."""

    async def go() -> T:
        async with opened(tmp_path) as queue, aiohttp.ClientSession() as session:
            client = GitHubClient(session, config.api_url)
            auth = Auth(config, client)

            def make(**options: Any) -> Sweeper:
                return Sweeper(config, queue, client, auth, **options)

            return await main(make, queue)

    return asyncio.run(go())


async def store(queue: Queue, guid: str) -> None:
    """What the bridge does with a delivery it received: store it under its GUID."""
    await queue.add(
        NewDelivery(
            guid=guid,
            github_event="push",
            action="",
            repo="octo-org/web.app",
            event="push",
            summary={},
            payload=b"{}",
            skip="stored for the test",
            jobs=(),
            received_at=time.time(),
        )
    )


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


PUSH = {"ref": "refs/heads/main", "repository": {"name": "web.app"}}


def test_sweep_asks_once_for_each_guid_never_answered_and_not_stored(
    github: FakeGitHub, tmp_path: Path
) -> None:
    add = github.add_delivery
    lost = add(PUSH, status_code=0, age=5 * HOUR)  # the bridge was down
    twice = add(PUSH, status_code=502, age=4 * HOUR)  # a proxy answered, then nothing
    twice_again = add(PUSH, status_code=0, guid=twice.guid, age=3 * HOUR, redelivery=True)
    late = add(PUSH, status_code=503, age=3 * HOUR).guid  # stored, but answered too late
    answered_later = add(PUSH, status_code=0, age=2 * HOUR)
    add(PUSH, status_code=202, guid=answered_later.guid, age=HOUR, redelivery=True)
    add(PUSH, status_code=401, age=HOUR)  # bad signature: on purpose
    add(PUSH, status_code=413, age=HOUR)  # too large: on purpose
    add(PUSH, status_code=400, age=HOUR)  # unreadable: on purpose
    add({"zen": "hi"}, status_code=0, event="ping", age=HOUR)  # pings are never stored
    add(PUSH, status_code=0, age=80 * HOUR)  # beyond the lookback
    for _ in range(250):  # three pages of answered deliveries on top
        add(PUSH, status_code=202, age=60)
    before = counter("vela_bridge_github_redeliveries_requested_total")
    ok_before = counter("vela_bridge_github_sweeps_total", result="ok")

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        await store(queue, late)
        sweeper = make()
        return [await sweeper.sweep(), await sweeper.sweep()]

    first, second = sweeping(tmp_path, app_config(github, redeliver=True), main)

    assert first.result == "ok"
    assert first.requested == (lost.guid, twice.guid)  # oldest first
    assert github.redeliveries == [("app", lost.id, lost.guid), ("app", twice_again.id, twice.guid)]
    assert second.result == "ok" and second.requested == ()
    assert github.redelivered() == [lost.guid, twice.guid]
    assert counter("vela_bridge_github_redeliveries_requested_total") == before + 2
    assert counter("vela_bridge_github_sweeps_total", result="ok") == ok_before + 2
    listed = [r for r in github.requests if r.path == "/app/hook/deliveries"]
    assert sum("cursor" in r.query for r in listed) >= 4  # paged, twice
    assert all(r.headers["Authorization"].lower().startswith("bearer ") for r in listed)
    assert github.rejected == []  # every JWT checked out


def test_guids_still_failing_are_asked_again_until_the_bridge_stores_them(
    github: FakeGitHub, tmp_path: Path
) -> None:
    github.redelivery_status = 503  # the redelivery fails too: the bridge is still unwell
    first = github.add_delivery(PUSH, status_code=0)
    second = github.add_delivery(PUSH, status_code=0)

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[tuple[str, ...]]:
        sweeper = make()
        asked = [(await sweeper.sweep()).requested]
        await store(queue, first.guid)
        asked.append((await sweeper.sweep()).requested)
        await store(queue, second.guid)
        asked.append((await sweeper.sweep()).requested)
        return asked

    asked = sweeping(tmp_path, app_config(github, redeliver=True), main)
    assert asked == [(first.guid, second.guid), (second.guid,), ()]


def test_the_bound_holds_and_the_rest_waits_for_the_next_sweep(
    github: FakeGitHub, tmp_path: Path
) -> None:
    lost = [github.add_delivery(PUSH, status_code=0, age=100 - i).guid for i in range(7)]
    config = app_config(github, redeliver=True, redeliver_max_per_sweep=3)

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        sweeper = make()
        return [await sweeper.sweep() for _ in range(4)]

    reports = sweeping(tmp_path, config, main)
    assert [r.requested for r in reports] == [
        tuple(lost[0:3]),
        tuple(lost[3:6]),
        tuple(lost[6:7]),
        (),
    ]
    assert [r.left for r in reports] == [4, 1, 0, 0]
    assert github.redelivered() == lost


def _attempt_requests(server: FakeGitHub) -> list[str]:
    """The paths of every redelivery request the server got, accepted or refused."""
    return [r.path for r in server.requests if r.method == "POST" and r.path.endswith("/attempts")]


def test_the_bound_counts_redelivery_requests_github_refused_too(
    github: FakeGitHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """github.md: redeliver_max_per_sweep bounds the redelivery *requests* of a sweep,
    so deliveries GitHub will not redeliver (422) do not let it ask for the whole backlog;
    and those are not asked for again, so they cannot use up the next sweep's bound."""
    lost = [github.add_delivery(PUSH, status_code=0, age=100 - i) for i in range(7)]
    for gone in lost[:4]:
        body = {"message": "Validation Failed"}
        github.fail_next(Failure(422, body=body, path=f"/{gone.id}/attempts", count=1_000))
    config = app_config(github, redeliver=True, redeliver_max_per_sweep=3)
    asked_before = counter("vela_bridge_github_redeliveries_requested_total")
    errors_before = counter("vela_bridge_github_sweeps_total", result="error")
    caplog.set_level(logging.INFO, logger="bridge.github.sweep")

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        sweeper = make()
        first = await sweeper.sweep()
        made = _attempt_requests(github)
        return [first, made, await sweeper.sweep()]

    first, made, second = sweeping(tmp_path, config, main)
    oldest = [f"/app/hook/deliveries/{e.id}/attempts" for e in lost[:3]]
    assert made == oldest  # three requests, the oldest first; none beyond the bound
    assert (first.result, first.requested, first.refused, first.left) == ("error", (), 3, 4)
    # The next sweep passes over the three refused: one more refusal, then two asked for.
    assert (second.refused, second.requested) == (1, (lost[4].guid, lost[5].guid))
    assert second.left == 1
    assert _attempt_requests(github)[3:] == [
        f"/app/hook/deliveries/{e.id}/attempts" for e in lost[3:6]
    ]
    assert counter("vela_bridge_github_redeliveries_requested_total") == asked_before + 2
    assert counter("vela_bridge_github_sweeps_total", result="error") == errors_before + 2
    messages = [r.getMessage() for r in caplog.records]
    refusals = [m for m in messages if m.startswith("github refused a redelivery")]
    assert len(refusals) == 4 and all("not asked for again" in m for m in refusals)
    assert "github sweep error: 0 redeliveries requested, 3 refused" in messages
    assert any(m.startswith("github sweep bound reached") for m in messages)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (502, None),  # GitHub unwell
        (403, {"message": "Resource not accessible by integration"}),  # not a rate limit
        (401, {"message": "Bad credentials"}),
    ],
    ids=["502", "403-permission", "401"],
)
def test_an_error_on_a_redelivery_ends_the_sweep_until_the_next(
    github: FakeGitHub,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: dict[str, str] | None,
) -> None:
    """github.md: GitHub API errors delay the sweep. A refusal that is about GitHub or the
    credential, not the delivery, would meet every other request too: the sweep stops at
    the first, and the next sweep asks for the same deliveries again."""
    lost = [github.add_delivery(PUSH, status_code=0, age=100 - i) for i in range(5)]
    github.fail_next(Failure(status, body=body, path="/attempts", count=1_000))
    config = app_config(github, redeliver=True, redeliver_max_per_sweep=3)
    caplog.set_level(logging.INFO, logger="bridge.github.sweep")

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        sweeper = make()
        refused = await sweeper.sweep()
        made = _attempt_requests(github)
        github.failures.clear()  # GitHub accepts again (no request is under way)
        return [refused, made, await sweeper.sweep()]

    refused, made, recovered = sweeping(tmp_path, config, main)
    assert made == [f"/app/hook/deliveries/{lost[0].id}/attempts"]  # the first, then stop
    assert (refused.result, refused.requested, refused.refused, refused.left) == ("error", (), 1, 5)
    assert recovered.result == "ok" and recovered.requested == tuple(e.guid for e in lost[:3])
    assert recovered.left == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("github refused a redelivery; the sweep of the") for m in messages)


def two_hooks_config(server: FakeGitHub, **overrides: Any) -> GitHubConfig:
    """Token mode, sweeping a repository's hook (id 11) and an organisation's (id 12)."""
    return GitHubConfig(
        webhook_secrets=(Secret("s"),),
        api_url=server.url,
        token=Secret(TOKEN),
        hooks=(GitHubHook(11, repo="octo-org/web.app"), GitHubHook(12, org="octo-org")),
        redeliver=True,
        **overrides,
    )


def test_the_bound_spans_the_hooks_of_a_sweep_refused_requests_included(tmp_path: Path) -> None:
    """Token mode with two hooks: what the first hook's refused requests spent is not
    available to the second."""
    server = FakeGitHub(public_key=app_key()[1]).start()
    try:
        first, second = repo_hook("octo-org/web.app", 11), org_hook("octo-org", 12)
        entries = [server.add_delivery(PUSH, status_code=0, hook=h) for h in (first,) * 2]
        entries += [server.add_delivery(PUSH, status_code=0, hook=second) for _ in range(2)]
        for entry in entries:
            server.fail_next(Failure(422, path=f"/{entry.id}/attempts", count=1_000))
        config = two_hooks_config(server, redeliver_max_per_sweep=3)

        async def main(make: Callable[..., Sweeper], queue: Queue) -> Any:
            return await make().sweep()

        report = sweeping(tmp_path, config, main)
        made = _attempt_requests(server)
        assert len(made) == 3, made
        assert [p.split("/hooks/")[0] for p in made] == ["/repos/octo-org/web.app"] * 2 + [
            "/orgs/octo-org"
        ]
        assert (report.result, report.requested, report.refused, report.left) == ("error", (), 3, 1)
    finally:
        server.stop()


def test_a_delivery_one_hook_cannot_redeliver_is_still_asked_of_another_hook(
    tmp_path: Path,
) -> None:
    """The same event reached a repository's hook and its organisation's, and both failed:
    one GUID, two deliveries. GitHub refusing one hook's does not make the event lost."""
    server = FakeGitHub(public_key=app_key()[1]).start()
    try:
        guid = "6f1c0a4e-0000-4000-8000-000000000001"
        mine = server.add_delivery(
            PUSH, status_code=0, guid=guid, hook=repo_hook("octo-org/web.app", 11)
        )
        org = server.add_delivery(PUSH, status_code=0, guid=guid, hook=org_hook("octo-org", 12))
        server.fail_next(Failure(422, path=f"/{mine.id}/attempts", count=1_000))

        async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
            sweeper = make()
            return [await sweeper.sweep(), await sweeper.sweep()]

        first, second = sweeping(tmp_path, two_hooks_config(server), main)
        asked = _attempt_requests(server)
    finally:
        server.stop()
    assert (first.requested, first.refused) == ((guid,), 1)  # the org hook's, asked for
    assert (second.requested, second.refused) == ((), 0)  # nor is the refused one again
    assert asked == [
        f"/repos/octo-org/web.app/hooks/11/deliveries/{mine.id}/attempts",
        f"/orgs/octo-org/hooks/12/deliveries/{org.id}/attempts",
    ]


def _primary(seconds: int) -> Failure:
    """GitHub's primary rate limit: nothing remaining until X-RateLimit-Reset."""
    return Failure(
        403,
        {
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(time.time()) + seconds),
        },
        {"message": "API rate limit exceeded for installation ID 1."},
        path="/deliveries",
    )


@pytest.mark.parametrize(
    ("failure", "delay"),
    [
        (lambda: Failure(429, {"Retry-After": "120"}, path="/deliveries"), 120),
        (lambda: _primary(900), 900),
        (
            lambda: Failure(
                403,
                body={"message": "You have exceeded a secondary rate limit."},
                path="/deliveries",
            ),
            60,
        ),
    ],
    ids=["429-retry-after", "403-primary", "403-secondary"],
)
def test_rate_limits_delay_the_next_sweep_without_crashing(
    github: FakeGitHub, tmp_path: Path, failure: Callable[[], Failure], delay: float
) -> None:
    lost = github.add_delivery(PUSH, status_code=0)
    github.fail_next(failure())
    limited = counter("vela_bridge_github_sweeps_total", result="rate_limited")

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        sweeper = make()
        return [await sweeper.sweep(), await sweeper.sweep()]

    config = app_config(github, redeliver=True, redeliver_interval_seconds=10)
    first, second = sweeping(tmp_path, config, main)
    assert first.result == "rate_limited" and first.requested == ()
    assert first.next_in == pytest.approx(delay, abs=3)
    assert second.result == "ok" and second.requested == (lost.guid,)
    assert counter("vela_bridge_github_sweeps_total", result="rate_limited") == limited + 1


def test_a_rate_limit_on_a_redelivery_stops_the_sweep_and_keeps_the_rest(
    github: FakeGitHub, tmp_path: Path
) -> None:
    lost = [github.add_delivery(PUSH, status_code=0, age=100 - i).guid for i in range(3)]
    github.fail_next(Failure(429, {"Retry-After": "30"}, path="/attempts"))

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        sweeper = make()
        return [await sweeper.sweep(), await sweeper.sweep()]

    first, second = sweeping(tmp_path, app_config(github, redeliver=True), main)
    assert (first.result, first.requested) == ("rate_limited", ())
    assert first.next_in == 300  # the interval is longer than GitHub's wait
    assert second.requested == tuple(lost)


@pytest.mark.parametrize(
    "failure",
    [
        Failure(500, path="/deliveries"),
        Failure(403, body={"message": "Resource not accessible by integration"}, path="/"),
    ],
    ids=["500", "403-permission"],
)
def test_github_errors_end_the_sweep_and_the_next_one_tries_again(
    github: FakeGitHub, tmp_path: Path, failure: Failure
) -> None:
    lost = github.add_delivery(PUSH, status_code=0)
    github.fail_next(failure)
    errors = counter("vela_bridge_github_sweeps_total", result="error")

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        sweeper = make()
        return [await sweeper.sweep(), await sweeper.sweep()]

    config = app_config(github, redeliver=True, redeliver_interval_seconds=7)
    first, second = sweeping(tmp_path, config, main)
    assert (first.result, first.requested, first.next_in) == ("error", (), 7)
    assert second.requested == (lost.guid,)
    assert counter("vela_bridge_github_sweeps_total", result="error") >= errors + 1


def test_an_unreachable_github_is_an_error_not_a_crash(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    config = GitHubConfig(
        webhook_secrets=(Secret("s"),),
        api_url=dead,
        app_id=1,
        private_key=Secret(app_key()[0]),
        redeliver=True,
    )

    async def main(make: Callable[..., Sweeper], queue: Queue) -> Any:
        return await make().sweep()

    assert sweeping(tmp_path, config, main).result == "error"


def test_a_jwt_from_another_key_is_refused_by_the_fake(github: FakeGitHub, tmp_path: Path) -> None:
    pem = new_key()[0]  # not the key the fake checks JWTs against
    github.add_delivery(PUSH, status_code=0)

    async def main(make: Callable[..., Sweeper], queue: Queue) -> Any:
        return await make().sweep()

    config = app_config(github, redeliver=True, private_key=Secret(pem))
    assert sweeping(tmp_path, config, main).result == "error"
    assert github.redelivered() == []
    assert len(github.rejected) == 1 and "could not be decoded" in github.rejected[0]


def test_only_one_replica_sweeps_at_a_time(github: FakeGitHub, tmp_path: Path) -> None:
    lost = github.add_delivery(PUSH, status_code=0)
    github.redelivery_status = 503

    async def main(make: Callable[..., Sweeper], queue: Queue) -> list[Any]:
        a, b = make(holder="replica-a"), make(holder="replica-b")
        reports = [await a.sweep(), await b.sweep(), await a.sweep()]
        await a.stop()  # hands the lease on
        reports.append(await b.sweep())
        leads = await queue.try_lead(LEASE_NAME, "replica-a", 60, time.time())
        return [*reports, leads]

    a1, b1, a2, b2, a_again = sweeping(tmp_path, app_config(github, redeliver=True), main)
    assert [r.result for r in (a1, b1, a2, b2)] == ["ok", "standby", "ok", "ok"]
    assert b1.requested == ()
    assert github.redelivered() == [lost.guid] * 3
    assert a_again is False  # b holds it now


def test_token_mode_sweeps_repository_and_organization_hooks_on_ghes(tmp_path: Path) -> None:
    server = FakeGitHub(public_key=app_key()[1], prefix="/api/v3").start()
    try:
        repo = server.add_delivery(PUSH, status_code=0, hook=repo_hook("octo-org/web.app", 11))
        org = server.add_delivery(PUSH, status_code=502, hook=org_hook("octo-org", 12))
        server.add_delivery(PUSH, status_code=202, hook=repo_hook("octo-org/web.app", 11))
        config = two_hooks_config(server)

        async def main(make: Callable[..., Sweeper], queue: Queue) -> Any:
            return await make().sweep()

        report = sweeping(tmp_path, config, main)
        assert report.requested == (repo.guid, org.guid)
        assert server.redeliveries == [
            (repo_hook("octo-org/web.app", 11), repo.id, repo.guid),
            (org_hook("octo-org", 12), org.id, org.guid),
        ]
        assert {r.path for r in server.requests} >= {
            "/api/v3/repos/octo-org/web.app/hooks/11/deliveries",
            f"/api/v3/orgs/octo-org/hooks/12/deliveries/{org.id}/attempts",
        }
        assert all(r.headers["Authorization"] == f"token {TOKEN}" for r in server.requests)
        assert server.rejected == []
    finally:
        server.stop()


def test_the_loop_sweeps_at_start_up_then_periodically_and_stops_cleanly(
    github: FakeGitHub, tmp_path: Path
) -> None:
    github.add_delivery(PUSH, status_code=0)
    github.redelivery_status = 503
    config = app_config(github, redeliver=True, redeliver_interval_seconds=0.2)

    async def main(make: Callable[..., Sweeper], queue: Queue) -> None:
        sweeper = make()
        sweeper.start(0)
        await asyncio.sleep(0.7)
        await sweeper.stop()

    sweeping(tmp_path, config, main)
    assert 3 <= len(github.redelivered()) <= 5


def test_a_rate_limited_sweep_moves_the_next_one_later(github: FakeGitHub, tmp_path: Path) -> None:
    github.add_delivery(PUSH, status_code=0)
    github.fail_next(Failure(429, {"Retry-After": "30"}, path="/deliveries"))
    config = app_config(github, redeliver=True, redeliver_interval_seconds=0.1)

    async def main(make: Callable[..., Sweeper], queue: Queue) -> None:
        sweeper = make()
        sweeper.start(0)
        await asyncio.sleep(0.6)
        await sweeper.stop()

    sweeping(tmp_path, config, main)
    listings = [r for r in github.requests if r.path == "/app/hook/deliveries"]
    assert len(listings) == 1  # the 429; nothing more for 30 s
    assert github.redelivered() == []


@pytest.mark.parametrize(
    ("codes", "asked"),
    [
        ([0], True),
        ([500, 0, 503], True),
        ([0, 200], False),
        ([0, 202], False),
        ([401], False),
        ([0, 413], False),
        ([302], False),
    ],
)
def test_failed_is_every_attempt_unanswered_or_5xx(codes: list[int], asked: bool) -> None:
    attempts = [
        DeliveryAttempt(i, "g", code, float(i), i > 0, "push") for i, code in enumerate(codes)
    ]
    found = failed(attempts)
    assert bool(found) is asked
    if asked:
        assert found == [attempts[-1]]  # the newest attempt is the one redelivered


def test_failed_orders_oldest_guid_first_and_ignores_pings() -> None:
    attempt = DeliveryAttempt(1, "a", 0, 100.0, False, "push")
    newer = dataclasses.replace(attempt, id=2, guid="b", delivered_at=50.0)
    again = dataclasses.replace(attempt, id=3, delivered_at=200.0, redelivery=True)
    ping = dataclasses.replace(attempt, id=4, guid="p", delivered_at=10.0, event="ping")
    assert failed([again, newer, attempt, ping]) == [newer, again]
