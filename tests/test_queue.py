"""Both queues, SQLite on a real file and PostgreSQL on a real server, against one contract:
dedupe, numbering, lanes, claims, group commit, retention; then what each does its own way
(SQLite: one process owns the file; PostgreSQL: replicas share it, leases expire)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import sqlite3
import string
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import Conflict, NotFound, QueueLocked, QueueUnavailable
from bridge.queue import (
    Added,
    Attempt,
    ClaimedJob,
    JobRecord,
    NewDelivery,
    NewJob,
    Page,
    Queue,
    Settlement,
    open_queue,
)
from bridge.queue.sqlite import CLAIM_SQL, SQLiteQueue
from bridge.states import IllegalTransition, JobState

T = TypeVar("T")
DAY = 86_400.0


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The queue URL, once for each implementation (PostgreSQL: a database of its own)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'q.db'}"
    pg: str = request.getfixturevalue("pg_url")
    return pg


async def opened(url: str, **options: Any) -> Queue:
    return await open_queue(
        url, lease_seconds=options.get("lease", 60), retention_days=options.get("days", 14)
    )


def run(make: Callable[[Any], Awaitable[T]], url: str, **options: Any) -> T:
    """Open the queue at ``url``, run ``make(queue)``, close it."""

    async def main() -> T:
        queue = await opened(url, **options)
        try:
            return await make(queue)
        finally:
            await queue.close()

    return asyncio.run(main())


def commits(queue: Any) -> int:
    """Transactions committed for adds (SQLite: all writes)."""
    writer = queue._writer if isinstance(queue, SQLiteQueue) else queue._adds
    return int(writer.commits)


def delivery(
    guid: str, *, repo: str = "Octo/App", lane: str = "main", jobs: int = 1, at: float | None = None
) -> NewDelivery:
    return NewDelivery(
        guid=guid,
        github_event="push",
        action="",
        repo=repo,
        event="push" if jobs else "",
        summary={"commit": "abc"},
        payload=b'{"ref": "refs/heads/main"}',
        skip=None if jobs else "not forwarded",
        jobs=tuple(
            NewJob("builds", "Octo", "App", "/api/v1/repos/Octo/App/builds", b"{}", lane)
            for _ in range(jobs)
        ),
        received_at=time.time() if at is None else at,
    )


def success(now: float) -> Settlement:
    return Settlement(JobState.SUCCESS, Attempt(now, 0.01, 201, "", "{}"), vela_number=1)


def test_add_dedupes_on_guid_within_and_across_batches(url: str) -> None:
    async def main(q: Queue) -> list[Added]:
        together = await asyncio.gather(*(q.add(delivery("same")) for _ in range(5)))
        later = await q.add(delivery("same"))
        return [*together, later]

    results = run(main, url)
    assert results.count(Added.QUEUED) == 1
    assert results.count(Added.DUPLICATE) == 5


def test_skipped_delivery_is_stored_without_jobs(url: str) -> None:
    async def main(q: Queue) -> tuple[Added, Any]:
        return await q.add(delivery("s", jobs=0)), await q.delivery("s")

    added, stored = run(main, url)
    assert added is Added.SKIPPED
    assert stored.status == "skipped" and stored.error == "not forwarded"
    assert stored.jobs == () and stored.finished_at is not None


def test_numbers_are_per_repository_case_insensitive_and_survive_reopening(url: str) -> None:
    async def first(q: Queue) -> None:
        await q.add(delivery("a1", repo="Octo/App"))
        await q.add(delivery("b1", repo="other/repo"))
        await q.add(delivery("a2", repo="octo/app"))
        await q.add(delivery("a2", repo="octo/app"))  # a duplicate takes no number

    async def second(q: Queue) -> list[int]:
        await q.add(delivery("a3", repo="OCTO/APP"))
        return [(await q.delivery(g)).number for g in ("a1", "a2", "a3", "b1")]

    run(first, url)
    assert run(second, url) == [1, 2, 3, 1]


def test_a_lane_forwards_one_job_at_a_time_in_order(url: str) -> None:
    async def main(q: Queue) -> list[list[str]]:
        for guid in ("first", "second", "third"):
            await q.add(delivery(guid, lane="main"))
        await q.add(delivery("elsewhere", lane="dev"))
        now = time.time()
        rounds = []
        for _ in range(4):
            claimed = await q.claim(10, now)
            rounds.append(sorted(job.guid for job in claimed))
            for job in claimed:
                await q.settle(job.id, success(now), now)
        return rounds

    assert run(main, url) == [["elsewhere", "first"], ["second"], ["third"], []]


def test_a_retrying_head_holds_its_lane_until_due(url: str) -> None:
    async def main(q: Queue) -> tuple[list[str], list[str], float | None]:
        await q.add(delivery("first"))
        await q.add(delivery("second"))
        now = time.time()
        (job,) = await q.claim(10, now)
        retry = Settlement(
            JobState.RETRYING, Attempt(now, 0.1, 503, "busy", ""), next_attempt_at=now + 30
        )
        await q.settle(job.id, retry, now)
        blocked = [j.guid for j in await q.claim(10, now + 1)]
        due = await q.next_due()
        later = [j.guid for j in await q.claim(10, now + 31)]
        return blocked, later, due

    blocked, later, due = run(main, url)
    assert blocked == []
    assert later == ["first"]
    assert due is not None and due > time.time() + 20


def test_settling_twice_is_an_illegal_transition(url: str) -> None:
    async def main(q: Queue) -> None:
        await q.add(delivery("g"))
        now = time.time()
        (job,) = await q.claim(1, now)
        await q.settle(job.id, success(now), now)
        with pytest.raises(IllegalTransition):
            await q.settle(job.id, success(now), now)

    run(main, url)


def test_concurrent_adds_share_commits(url: str) -> None:
    async def main(q: Queue) -> tuple[int, int]:
        before = commits(q)
        results = await asyncio.gather(*(q.add(delivery(f"g{i}")) for i in range(300)))
        assert results == [Added.QUEUED] * 300
        return commits(q) - before, len(results)

    made, adds = run(main, url)
    assert made < adds / 5, f"{made} commits for {adds} concurrent deliveries"


def test_one_batch_numbers_in_order_and_heads_each_new_lane_once(url: str) -> None:
    """Adds gathered together share a batch (SQLite: one bulk insert per table)."""

    async def main(q: Queue) -> tuple[list[Added], list[int | None], list[str]]:
        results = await asyncio.gather(
            q.add(delivery("a1", repo="Octo/App", lane="x")),
            q.add(delivery("b1", repo="other/repo", lane="y")),
            q.add(delivery("a1", repo="Octo/App", lane="x")),  # a duplicate in the same batch
            q.add(delivery("a2", repo="octo/app", lane="x")),
            q.add(delivery("s1", repo="Octo/App", jobs=0)),
            q.add(delivery("a3", repo="OCTO/APP", lane="y")),
        )
        stored = [await q.delivery(g) for g in ("a1", "a2", "s1", "a3", "b1")]
        claimed = await q.claim(10, time.time())
        return results, [d.number for d in stored if d is not None], [c.guid for c in claimed]

    results, numbers, claimed = run(main, url)
    q, dup, skipped = Added.QUEUED, Added.DUPLICATE, Added.SKIPPED
    assert results == [q, q, dup, q, skipped, q]
    assert numbers == [1, 2, 3, 4, 1]
    assert sorted(claimed) == ["a1", "b1"]  # one head per lane, the oldest


def test_a_claim_marks_the_delivery_running_until_its_last_job_settles(url: str) -> None:
    async def main(q: Queue) -> list[tuple[str, bool, bool]]:
        await q.add(delivery("two", jobs=2, lane="x"))
        seen = []

        async def look() -> None:
            d = await q.delivery("two")
            assert d is not None
            seen.append((d.status, d.started_at is not None, d.finished_at is not None))

        await look()
        now = time.time()
        for _ in range(2):  # one job at a time: both are in lane x
            [job] = await q.claim(10, now)
            await look()
            await q.settle(job.id, success(now), now)
            await look()
        return seen

    assert run(main, url) == [
        ("pending", False, False),
        ("running", True, False),
        ("running", True, False),  # the second job is still pending
        ("running", True, False),
        ("success", True, True),
    ]


def test_the_delivery_error_is_the_error_of_the_job_that_decides_its_status(url: str) -> None:
    """Two jobs in two lanes, settled in turn: the delivery's ``error`` follows its status,
    not whichever job settled last."""

    async def main(q: Queue) -> list[tuple[str, str]]:
        two = delivery("two", jobs=2)
        lanes = tuple(dataclasses.replace(job, lane=f"lane-{i}") for i, job in enumerate(two.jobs))
        await q.add(dataclasses.replace(two, jobs=lanes))
        now = time.time()
        first, second = sorted(await q.claim(10, now), key=lambda job: job.number)
        seen = []

        async def settle(job: ClaimedJob, s: Settlement) -> None:
            await q.settle(job.id, s, now)
            d = await q.delivery("two")
            assert d is not None
            seen.append((d.status, d.error))

        refused = Attempt(now, 0.01, 503, "Vela answered 503", "")
        retry = Settlement(JobState.RETRYING, refused, next_attempt_at=now, error=refused.error)
        await settle(first, retry)
        await settle(second, success(now))  # the first job still waits for its retry
        [again] = await q.claim(10, now)
        gave_up = Attempt(now, 0.01, 422, "Vela refused the build: 422", "")
        await settle(again, Settlement(JobState.FAILURE, gave_up, error=gave_up.error))
        return seen

    assert run(main, url) == [
        ("running", "Vela answered 503"),
        ("running", "Vela answered 503"),  # was "": the second job's success
        ("failure", "Vela refused the build: 422"),
    ]


def test_a_claim_says_when_the_jobs_run_was_first_claimed(url: str) -> None:
    """What a lookup after an unclear attempt may match is no older than this; a restart
    begins a new run."""

    t = time.time()

    async def main(q: Queue) -> list[float | None]:
        await q.add(delivery("g", at=t))
        seen = []
        for at in (t + 1, t + 2):
            [job] = await q.claim(10, at)
            seen.append(job.first_claimed_at)
            await q.release([job.id], at)
        [job] = await q.claim(10, t + 3)
        await q.settle(job.id, success(t + 3), t + 3, claim=job.claim)
        await q.restart("Octo/App", 1, lambda e, p: "unused", t + 4)
        [job] = await q.claim(10, t + 5)
        return [*seen, job.first_claimed_at]

    assert run(main, url) == [t + 1, t + 1, t + 5]


def test_time_paused_moves_a_jobs_first_attempt_forward(url: str) -> None:
    """retry.max_age counts from first_attempt_at; a settlement moves it forward by the
    time forwarding was paused since the job's previous attempt, which the claim gives
    (when it ended). Nothing moves before the first consumed attempt."""

    t = time.time()

    def retrying(at: float, status: int, **fields: Any) -> Settlement:
        attempt = Attempt(at, 0.5, status, "", "")
        return Settlement(JobState.RETRYING, attempt, next_attempt_at=at + 1, **fields)

    def since_t(at: float | None) -> float | None:
        return None if at is None else round(at - t, 6)

    async def main(q: Queue) -> list[tuple[int, float | None, float | None]]:
        await q.add(delivery("g", at=t))
        seen = []
        steps = [
            retrying(t, 401, consumed=False, paused=7.0),  # not yet begun: nothing moves
            retrying(t + 1, 503),  # the first consumed attempt
            retrying(t + 2, 401, consumed=False, paused=30.0),  # a probe, 30 s paused
            retrying(t + 40, 503, paused=5.0, error="busy"),  # waited, 5 s of it paused
        ]
        for n, settlement in enumerate(steps):
            [job] = await q.claim(10, t + 50 * n)
            seen.append((job.attempts, since_t(job.first_attempt_at), since_t(job.last_attempt_at)))
            assert await q.settle(job.id, settlement, t + 50 * n, claim=job.claim)
        [job] = await q.claim(10, t + 500)
        assert job.last_error == "busy"  # what a job past its max age fails with, unsent
        return [*seen, (job.attempts, since_t(job.first_attempt_at), since_t(job.last_attempt_at))]

    assert run(main, url) == [
        (0, None, None),
        (0, None, 0.5),
        (1, 1, 1.5),
        (1, 31, 2.5),
        (2, 36, 40.5),
    ]


def test_a_delivery_that_cannot_be_stored_fails_alone(tmp_path: Path) -> None:
    """SQLite: one bad row makes the bulk insert fail; the batch is run again item by item."""
    bad = dataclasses.replace(delivery("bad"), payload=object())  # SQLite cannot bind it

    async def main(q: Queue) -> tuple[list[Any], list[int | None]]:
        results = await asyncio.gather(
            q.add(delivery("ok1")), q.add(bad), q.add(delivery("ok2")), return_exceptions=True
        )
        stored = [await q.delivery(g) for g in ("ok1", "bad", "ok2")]
        return results, [None if d is None else d.number for d in stored]

    results, numbers = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert results[0] is Added.QUEUED and results[2] is Added.QUEUED
    assert isinstance(results[1], QueueUnavailable)
    assert numbers == [1, None, 2]  # the failed one took no number


def test_retention_drops_bodies_then_rows_keeping_guids_a_week(url: str) -> None:
    now = time.time()

    async def main(q: Queue) -> list[Any]:
        await q.add(delivery("old", jobs=0, at=now - 3 * DAY))
        await q.add(delivery("ancient", jobs=0, at=now - 8 * DAY))
        await q.add(delivery("fresh", jobs=0, at=now))
        await q.add(delivery("active", at=now - 3 * DAY))  # never forwarded: kept whole
        await q.purge(now)
        return [
            await q.delivery("old"),
            await q.delivery("ancient"),
            await q.delivery("fresh"),
            await q.delivery("active"),
            await q.add(delivery("old", jobs=0)),
        ]

    old, ancient, fresh, active, again = run(main, url, days=1)
    assert old is not None and not old.has_payload
    assert ancient is None
    assert fresh.has_payload
    assert active.has_payload and active.jobs[0].has_body
    assert again is Added.DUPLICATE


def test_a_repository_whose_deliveries_were_all_purged_has_no_builds(url: str) -> None:
    """operator-api.md: a repository with no stored delivery is a 404, also once retention
    has deleted the last one (its numbering goes on where it was)."""
    now = time.time()

    async def main(q: Queue) -> tuple[Exception | None, int | None]:
        await q.add(delivery("ancient", repo="Octo/Gone", jobs=0, at=now - 8 * DAY))
        await q.purge(now)
        try:
            await q.builds("octo/gone", None, Page())
        except NotFound as exc:
            refused: Exception | None = exc
        else:
            refused = None
        await q.add(delivery("next", repo="Octo/Gone", jobs=0))
        again = await q.delivery("next")
        return refused, None if again is None else again.number

    refused, number = run(main, url, days=1)
    assert isinstance(refused, NotFound)
    assert number == 2


def test_report_state_says_once_per_change(url: str) -> None:
    async def main(q: Queue) -> list[bool]:
        return [
            await q.report_state("g", "error"),
            await q.report_state("g", "error"),
            await q.report_state("g", "success"),
            await q.report_state("other", "error"),
        ]

    assert run(main, url) == [True, False, True, True]


def test_one_holder_leads_until_its_lease_expires(url: str) -> None:
    async def main(q: Queue) -> list[bool]:
        now = time.time()
        return [
            await q.try_lead("sweep", "a", 60, now),
            await q.try_lead("sweep", "b", 60, now + 1),
            await q.try_lead("sweep", "a", 60, now + 2),  # renewal
            await q.try_lead("sweep", "b", 60, now + 63),  # a's lease ran out
            await q.try_lead("sweep", "a", 60, now + 64),
        ]

    assert run(main, url) == [True, False, True, True, False]


def test_restart_and_cancel_follow_the_rules(url: str) -> None:
    def failure(now: float) -> Settlement:
        return Settlement(JobState.FAILURE, Attempt(now, 0.1, 422, "bad", "no"), error="bad")

    async def main(q: Queue) -> None:
        await q.add(delivery("one"))
        await q.add(delivery("two"))  # the same lane, behind "one"
        now = time.time()
        two = await q.cancel("octo/app", 2, 1, now)  # pending behind the head
        assert two.status == "killed" and two.jobs[0].state == "killed"
        assert two.error == "cancelled by an operator" and two.finished_at is not None
        with pytest.raises(Conflict):
            await q.cancel("Octo/App", 2, 1, now)  # already finished
        (job,) = await q.claim(10, now)
        assert job.guid == "one"
        with pytest.raises(Conflict):
            await q.restart("Octo/App", 1, lambda e, p: "unused", now)  # in flight
        with pytest.raises(Conflict):
            await q.cancel("Octo/App", 1, 1, now)  # in flight
        await q.settle(job.id, failure(now), now)
        failed = await q.build("OCTO/app", 1)
        assert failed.status == "failure" and failed.error == "bad"
        assert failed.jobs[0].exit_code == 422
        again = await q.restart("Octo/App", 1, lambda e, p: "unused", now + 1)
        assert again.status == "pending" and again.error == ""
        assert again.jobs[0].attempts == 0 and again.finished_at is None
        (retried,) = await q.claim(10, now + 1)
        assert (retried.id, retried.attempts, retried.unclear) == (job.id, 0, False)
        await q.settle(retried.id, success(now + 2), now + 2)
        restarted_two = await q.restart("Octo/App", 2, lambda e, p: "unused", now + 3)
        assert restarted_two.status == "pending"
        assert [j.guid for j in await q.claim(10, now + 3)] == ["two"]
        log_job, attempts = await q.job_log("Octo/App", 1, 1)
        assert log_job.state == "success"
        assert [a.http_status for a in attempts] == [422, 201]
        assert log_job.vela_number == 1 and log_job.exit_code == 201
        # A restart is a new run: nothing of the last one's answer or times shows.
        fresh = await q.restart("Octo/App", 1, lambda e, p: "unused", now + 4)
        assert (fresh.status, fresh.started_at, fresh.finished_at) == ("pending", None, None)
        [j] = fresh.jobs
        assert (j.vela_number, j.vela_link, j.exit_code, j.started_at) == (None, "", 0, None)
        for missing in (
            q.build("Octo/App", 99),
            q.cancel("Octo/App", 1, 5, now),
            q.job_log("Octo/App", 1, 5),
            q.restart("nobody/here", 1, lambda e, p: "unused", now),
        ):
            with pytest.raises(NotFound):
                await missing

    run(main, url)


def test_restart_of_a_skipped_delivery_converts_it_again(url: str) -> None:
    body = b'{"event": "push"}'
    converted = (NewJob("builds", "Octo", "App", "/api/v1/repos/Octo/App/builds", body, "main"),)

    async def main(q: Queue) -> None:
        await q.add(
            NewDelivery(
                guid="s", github_event="push", action="", repo="Octo/App", event="",
                summary={}, payload=b"{}", skip="not forwarded", jobs=(), received_at=time.time(),
            )
        )  # fmt: skip
        now = time.time()
        with pytest.raises(Conflict):
            await q.restart("Octo/App", 1, lambda e, p: "still not", now)
        seen: list[tuple[str, bytes]] = []

        def reconvert(event: str, payload: bytes) -> tuple[NewJob, ...]:
            seen.append((event, payload))
            return converted

        restarted = await q.restart("Octo/App", 1, reconvert, now)
        assert seen == [("push", b"{}")]
        assert restarted.status == "pending" and restarted.event == "push"
        assert [j.number for j in restarted.jobs] == [1]
        (job,) = await q.claim(10, now)
        assert (job.guid, job.body) == ("s", b'{"event": "push"}')

    run(main, url)


def test_listings_page_and_filter_newest_first(url: str) -> None:
    async def main(q: Queue) -> None:
        for i in range(7):
            await q.add(delivery(f"g{i}", lane=f"lane{i}", jobs=0 if i % 3 == 0 else 1))
        await q.add(delivery("elsewhere", repo="other/repo"))
        first = await q.builds("octo/app", None, Page(1, 3))
        second = await q.builds("octo/app", None, Page(2, 3))
        assert [d.number for d in first + second] == [7, 6, 5, 4, 3, 2]
        skipped = await q.builds("Octo/App", "skipped", Page())
        assert [d.guid for d in skipped] == ["g6", "g3", "g0"]
        with pytest.raises(NotFound):
            await q.builds("nobody/here", None, Page())
        everything = await q.deliveries(None, None, None, Page(1, 100))
        assert [d.guid for d in everything][:2] == ["elsewhere", "g6"]
        assert len(everything) == 8
        assert [d.guid for d in await q.deliveries("g4", None, None, Page())] == ["g4"]
        assert await q.deliveries(None, "pending", "pull_request", Page()) == []
        await q.add(
            dataclasses.replace(delivery("pr"), github_event="pull_request", action="opened")
        )
        for event in ("pull_request", "pull_request.opened"):  # as GitHub names it, or as shown
            assert [d.guid for d in await q.deliveries(None, None, event, Page())] == ["pr"]
        assert await q.deliveries(None, None, "pull_request.closed", Page()) == []
        assert await q.delivery("nobody") is None

    run(main, url)


def test_payloads_stats_and_vela_deployments(url: str) -> None:
    async def main(q: Queue) -> None:
        start = time.time()
        await q.add(delivery("g", at=start - 10))
        await q.add(delivery("h", at=start - 5))
        assert await q.payload("g") == b'{"ref": "refs/heads/main"}'
        assert await q.payload("nobody") is None
        count, age = await q.stats(start)
        assert count == 2 and 9 < age < 11
        (job,) = await q.claim(10, start)
        done = Settlement(JobState.SUCCESS, Attempt(start, 0.1, 201, "", "{}"), vela_deployment=41)
        await q.settle(job.id, done, start)
        assert await q.is_vela_deployment("octo/app", 41)
        assert not await q.is_vela_deployment("Octo/App", 42)
        assert (await q.stats(start))[0] == 1

    run(main, url)


def test_any_text_a_payload_carries_is_stored(url: str) -> None:
    """A NUL (a valid JSON escape; PostgreSQL text cannot hold it) must not make a 503."""

    async def main(q: Queue) -> None:
        odd = dataclasses.replace(delivery("g", lane="refs/heads/a\x00b"), action="x\x00")
        assert await q.add(odd) is Added.QUEUED
        assert await q.add(delivery("h", lane="refs/heads/a\x00b")) is Added.QUEUED
        stored = await q.delivery("g")
        assert stored is not None and stored.action.startswith("x")
        assert [j.guid for j in await q.claim(10, time.time())] == ["g"]  # h waits: same lane

    run(main, url)


# -- SQLite only: one process owns the file --------------------------------------------------


def test_claims_of_a_dead_process_are_released_on_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"

    async def crash(q: Queue) -> None:
        await q.add(delivery("g"))
        assert len(await q.claim(10, time.time())) == 1  # then "dies" holding the claim

    async def reopen(q: Queue) -> Any:
        stored = await q.delivery("g")
        claimed = await q.claim(10, time.time())
        return stored, claimed

    run(crash, url)
    stored, claimed = run(reopen, url)
    assert stored.jobs[0].state == "retrying"
    assert stored.jobs[0].unclear
    assert [job.unclear for job in claimed] == [True]


def test_a_queue_opened_through_a_symlink_syncs_and_locks_the_real_file(tmp_path: Path) -> None:
    real, link = tmp_path / "real.db", tmp_path / "link.db"
    real.touch()
    link.symlink_to(real)

    async def main() -> None:
        q = await open_queue(f"sqlite:///{link}", lease_seconds=60, retention_days=1)
        try:
            await q.add(delivery("g"))
            with pytest.raises(QueueLocked):
                await open_queue(f"sqlite:///{real}", lease_seconds=60, retention_days=1)
        finally:
            await q.close()

    asyncio.run(main())
    assert not (tmp_path / "link.db-wal").exists()


def test_a_second_queue_on_the_same_file_is_refused(tmp_path: Path) -> None:
    async def main(q: Queue) -> None:
        with pytest.raises(QueueLocked):
            await SQLiteQueue.open(str(tmp_path / "q.db"), lease_seconds=60, retention_days=14)

    run(main, f"sqlite:///{tmp_path / 'q.db'}")


def test_the_sqlite_readiness_check_stores_a_delivery_and_leaves_nothing(tmp_path: Path) -> None:
    """SQLite's ping commits a probe delivery's insert and delete: a real write, unseen."""

    async def main(q: Any) -> tuple[int, Added, list[str], int | None]:
        before = commits(q)
        await q.ping()
        written = commits(q) - before
        added = await q.add(delivery("a"))
        await q.ping()
        listed = await q.deliveries(None, None, None, Page())
        return written, added, [d.guid for d in listed], listed[0].number

    written, added, listed, number = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert written == 1 and added is Added.QUEUED
    assert listed == ["a"] and number == 1


def test_claim_reads_an_index_not_the_backlog(tmp_path: Path) -> None:
    run(lambda q: q.ping(), f"sqlite:///{tmp_path / 'q.db'}")
    conn = sqlite3.connect(tmp_path / "q.db")
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL, (0, 1)))
    conn.close()
    assert "USING INDEX jobs_ready" in plan
    assert "SCAN j" not in plan and "SCAN jobs" not in plan, plan


# -- PostgreSQL only: replicas share the database, claims are leases ---------------------------


def test_postgres_retakes_a_dead_replicas_claim_once_its_lease_expires(pg_url: str) -> None:
    async def main() -> None:
        a = await opened(pg_url, lease=5)
        await a.add(delivery("g"))
        await a.add(delivery("behind"))  # the same lane: waits while "g" is claimed
        now = time.time()
        (job,) = await a.claim(10, now)
        assert not job.unclear
        # Another replica starts while "a" holds the claim: nothing is released.
        b = await opened(pg_url, lease=5)
        try:
            stored = await b.delivery("g")
            assert stored is not None and stored.jobs[0].state == "running"
            assert await b.claim(10, now + 1) == []  # the lease still holds
            (again,) = await b.claim(10, now + 6)  # "a" is presumed dead
            assert (again.id, again.guid, again.unclear) == (job.id, "g", True)
            # "a" was only slow: its late outcome must not overwrite b's claim.
            await a.settle(job.id, success(now + 7), now + 7)
            stored = await b.delivery("g")
            assert stored is not None and stored.jobs[0].state == "running"
            await b.settle(again.id, success(now + 8), now + 8)
            stored = await b.delivery("g")
            assert stored is not None and stored.status == "success"
            assert [j.guid for j in await a.claim(10, now + 9)] == ["behind"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_postgres_release_frees_only_the_claim_this_replica_holds(pg_url: str) -> None:
    """A shutdown's release of a job whose claim was settled and then retaken by another
    replica leaves that replica's claim alone (it used to free any running claim)."""
    import psycopg

    async def main() -> None:
        a, b = await opened(pg_url, lease=5), await opened(pg_url, lease=5)
        try:
            await a.add(delivery("g"))
            now = time.time()
            (job,) = await a.claim(10, now)
            (again,) = await b.claim(10, now + 6)  # a's lease ran out: b holds the job now
            # a's late outcome, then a's shutdown still listing the job as in flight.
            failed = Settlement(
                JobState.RETRYING, Attempt(now, 1, 502, "", ""), next_attempt_at=now
            )
            assert await a.settle(job.id, failed, now + 7, claim=job.claim) is False
            await a.release([job.id], now + 7)
            with psycopg.connect(pg_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT state, claim_token FROM jobs WHERE id = %s", (job.id,)
                ).fetchone()
            assert row == ("running", again.claim)
            assert await a.claim(10, now + 8) == []  # b's lease holds: nobody else sends it
            # b's own release frees its claim: the job retries at once, looked up first.
            await b.release([again.id], now + 8)
            (third,) = await a.claim(10, now + 8)
            assert (third.id, third.unclear) == (job.id, True)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_postgres_intake_answers_unavailable_soon_when_a_peer_holds_a_lock(pg_url: str) -> None:
    """A stuck session holding a lock intake needs costs a quick QueueUnavailable (503),
    well within GitHub's 10 s, not a wait for ever; nothing is half-stored; and once the
    lock is gone intake works again. The same for a statement that is merely slow."""
    import psycopg

    async def main() -> None:
        q = await opened(pg_url)
        try:
            assert await q.add(delivery("before")) is Added.QUEUED
            with psycopg.connect(pg_url) as peer:  # a transaction left open, holding the lock
                peer.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
                started = time.monotonic()
                try:
                    with pytest.raises(QueueUnavailable, match="lock timeout"):
                        await asyncio.wait_for(q.add(delivery("blocked")), 9)
                    took = time.monotonic() - started
                finally:
                    peer.rollback()
            assert took < 5, took
            assert await q.delivery("blocked") is None
            assert await q.add(delivery("blocked")) is Added.QUEUED
            stored = await q.delivery("blocked")
            assert stored is not None and stored.number == 2  # no number was used up
            # Slow without any lock: intake's statement timeout cancels it.
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute(
                    "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS"
                    " $$ BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$;"
                    " CREATE TRIGGER slow BEFORE INSERT ON deliveries"
                    " FOR EACH ROW EXECUTE FUNCTION slow()"
                )
            started = time.monotonic()
            with pytest.raises(QueueUnavailable, match="statement timeout"):
                await asyncio.wait_for(q.add(delivery("slow")), 9)
            assert time.monotonic() - started < 8
            assert await q.delivery("slow") is None
            # The pool's sessions carry the bounds (and an idle transaction's).
            async with q._pool.connection() as conn:  # type: ignore[attr-defined]
                cur = await conn.execute(
                    "SELECT current_setting('lock_timeout'),"
                    " current_setting('idle_in_transaction_session_timeout')"
                )
                assert await cur.fetchone() == ("2s", "10s")
        finally:
            await q.close()

    asyncio.run(main())


@pytest.mark.slow
def test_postgres_queue_serves_again_soon_after_an_outage(pg_cluster: Any) -> None:
    """The server stops for 20 s while the queue is in use, then comes back: the queue
    serves again within a few seconds. (With psycopg_pool's default reconnect_timeout,
    300 s, the pool's doubling waits between tries had reached 16 s: ~8 s more.)"""

    async def main() -> float:
        q = await opened(pg_cluster.url)
        try:
            await q.ping()

            async def serving(until: float) -> bool:
                while time.monotonic() < until:  # polled like /readyz and the forwarder
                    try:
                        await asyncio.wait_for(q.ping(), until - time.monotonic())
                        return True
                    except (QueueUnavailable, TimeoutError):
                        await asyncio.sleep(0.2)
                return False

            pg_cluster.pause()
            assert not await serving(time.monotonic() + 20)
            pg_cluster.resume()  # returns once the server accepts connections
            back = time.monotonic()
            assert await serving(back + 60)
            return time.monotonic() - back
        finally:
            await q.close()

    took = asyncio.run(main())
    assert took < 4, f"served again {took:.1f} s after the server was back"


def test_postgres_readiness_fails_while_the_server_is_read_only(pg_cluster: Any) -> None:
    """The server turns read-only under open connections (a failover to a standby
    looks the same to them): the readiness check fails with intake, and passes again
    with it, leaving nothing behind."""
    import psycopg

    def read_only(on: bool) -> None:
        with psycopg.connect(pg_cluster.url, autocommit=True) as conn:
            value = "on" if on else "off"
            conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the backends read the configuration again between statements

    async def main() -> list[Any]:
        q = await opened(pg_cluster.url)
        try:
            await q.ping()
            read_only(True)
            try:
                outcomes: list[Any] = []
                for call in (q.ping(), q.add(delivery("g1"))):
                    try:
                        outcomes.append(await call)
                    except QueueUnavailable as exc:
                        outcomes.append(str(exc))
            finally:
                read_only(False)
            await q.ping()
            outcomes.append(await q.add(delivery("g2")))
            with psycopg.connect(pg_cluster.url) as conn:
                outcomes.append(conn.execute("SELECT count(*) FROM leases").fetchone())
            return outcomes
        finally:
            await q.close()

    ping, add, added, leases = asyncio.run(main())
    assert "read-only transaction" in ping and "read-only transaction" in add
    assert added is Added.QUEUED
    assert leases == (0,)


def test_postgres_replicas_dedupe_and_number_as_one(pg_url: str) -> None:
    async def main() -> tuple[list[Added], list[int]]:
        a, b = await asyncio.gather(opened(pg_url), opened(pg_url))  # migrations race too
        try:
            guids = [f"g{i}" for i in range(100)]
            # Every GUID reaches both replicas at once (GitHub redelivering to the other).
            results = await asyncio.gather(
                *(q.add(delivery(g, repo=random.choice(["Octo/App", "octo/APP"])))
                  for g in guids for q in (a, b))
            )  # fmt: skip
            numbers = []
            for g in guids:
                stored = await random.choice((a, b)).delivery(g)
                assert stored is not None and stored.number is not None
                numbers.append(stored.number)
            return list(results), numbers
        finally:
            await a.close()
            await b.close()

    results, numbers = asyncio.run(main())
    assert results.count(Added.QUEUED) == 100
    assert results.count(Added.DUPLICATE) == 100
    assert sorted(numbers) == list(range(1, 101))


def test_postgres_lanes_hold_across_replicas(pg_url: str) -> None:
    lanes, per_lane = 8, 6

    async def main() -> dict[str, list[str]]:
        a, b = await opened(pg_url), await opened(pg_url)
        try:
            for i in range(per_lane):
                await asyncio.gather(
                    *(random.choice((a, b)).add(delivery(f"l{n}-{i}", lane=f"l{n}"))
                      for n in range(lanes))
                )  # fmt: skip
            order: dict[str, list[str]] = {}
            running: set[str] = set()

            async def worker(q: Queue) -> None:
                idle = 0
                while idle < 20:
                    claimed = await q.claim(3, time.time())
                    idle = 0 if claimed else idle + 1
                    for job in claimed:
                        lane = job.guid.split("-")[0]
                        assert lane not in running, f"two jobs of {lane} in flight"
                        running.add(lane)
                    await asyncio.sleep(random.uniform(0, 0.005))
                    for job in claimed:
                        lane = job.guid.split("-")[0]
                        running.discard(lane)
                        order.setdefault(lane, []).append(job.guid)
                        now = time.time()
                        await q.settle(job.id, success(now), now)
                    if not claimed:
                        await asyncio.sleep(0.005)

            await asyncio.gather(worker(a), worker(b), worker(a), worker(b))
            return order
        finally:
            await a.close()
            await b.close()

    order = asyncio.run(main())
    assert order == {f"l{n}": [f"l{n}-{i}" for i in range(per_lane)] for n in range(lanes)}


def test_postgres_claim_reads_an_index_not_the_backlog(pg_url: str) -> None:
    import psycopg

    from bridge.queue.postgres import CLAIM_SQL as PG_CLAIM_SQL

    run(lambda q: q.ping(), pg_url)
    params = {"now": time.time(), "limit": 64, "lease": time.time() + 60, "token": 1}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # A long history of finished jobs and a backlog waiting behind a few heads.
        conn.execute(
            "INSERT INTO jobs (delivery_id, number, state, endpoint, org, repo, path, lane, head,"
            " next_attempt_at, enqueued_at) SELECT i, 1, CASE WHEN i % 10 = 0 THEN 'pending'"
            " ELSE 'success' END, 'builds', 'o', 'r', '/p', 'lane' || (i % 50), i % 1000 = 0,"
            " i, i FROM generate_series(1, 50000) AS i"
        )
        conn.execute("ANALYZE jobs")

        def plan() -> str:
            rows = conn.execute("EXPLAIN " + PG_CLAIM_SQL, params).fetchall()
            return "\n".join(row[0] for row in rows)

        natural = plan()
        assert "jobs_ready" in natural, natural
        assert "Seq Scan on jobs" not in natural, natural
        conn.execute("SET enable_seqscan = off")
        forced = plan()
        assert "jobs_ready" in forced, forced


def test_postgres_url_password_is_never_shown(pg_url: str) -> None:
    dead = f"postgresql://bridge:hunter2@127.0.0.1:{_closed_port()}/queue?connect_timeout=2"

    async def main() -> None:
        await opened(dead)

    with pytest.raises(QueueUnavailable) as caught:
        asyncio.run(main())
    assert "hunter2" not in str(caught.value)
    assert "bridge:***@127.0.0.1" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:se#cret@db.example/q", "postgresql://u:***@db.example/q"),
        ("postgresql://u:se?cret@db.example/q", "postgresql://u:***@db.example/q"),
        ("postgres://u:se#c?ret:x@db.example:5432/q", "postgres://u:***@db.example:5432/q"),
        ("postgresql://u:se[c]ret&a=b@db.example/q", "postgresql://u:***@db.example/q"),
        ("postgresql://u:se%23c%2Fr%40et@db.example/q", "postgresql://u:***@db.example/q"),
        ("postgresql://:se#cret@[::1]:5432,h2/q", "postgresql://:***@[::1]:5432,h2/q"),
        (
            "postgresql://u@db.example/q?password=se#cret",
            "postgresql://u@db.example/q?password=***",
        ),
        (
            "postgresql://u@db.example?sslmode=require&pass%77ord=se%26cret&sslpassword=ke#y",
            "postgresql://u@db.example?sslmode=require&pass%77ord=***&sslpassword=***",
        ),
        # A ?password= holding an "@", with no /dbname: libpq's user information ends at
        # the first "@", the wide reading's at the last; neither reading's password shows.
        (
            "postgresql://u@db.example?sslmode=require&password=se@cret",
            "postgresql://u@db.example?sslmode=require&password=***",
        ),
        ("postgresql://u@h?password=a?b@cret", "postgresql://u@h?password=***"),
        ("postgresql://u:x@h?password=se@cr/et", "postgresql://u:***"),
        ("postgresql://u:pw@db.example?password=se@cr@etTail", "postgresql://u:***"),
        ("postgresql://u:a@b@c@h?password=x@y@zTail", "postgresql://u:***"),
        # Wide: a user "bridge@127.0.0.1" with a password "5432?password=Hunter2".
        (
            "postgresql://bridge@127.0.0.1:5432?password=Hunter2@Secret",
            "postgresql://bridge@127.0.0.1:***",
        ),
        # libpq reads a password "5432?password=se" (for a user "db.example", at a host "cret").
        ("postgresql://db.example:5432?password=se@cret", "postgresql://db.example:***"),
        # Not usable by libpq, yet meant as a password: not shown either.
        ("postgresql://db.example?password=se@cret", "postgresql://db.example?password=***"),
        ("postgresql://u:se@cret@db.example/q", "postgresql://u:***@db.example/q"),
        ("postgresql://u:se/cret@db.example/q", "postgresql://u:***@db.example/q"),
        ("postgresql://db.example:5432/q?options=-csearch_path%3Dx", None),
        ("sqlite:///./with:colon@at.db", None),
    ],
)
def test_postgres_url_masking_reads_the_url_as_libpq_does(url: str, shown: str | None) -> None:
    """masked() hides whatever libpq would send as a password, whatever its characters."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from bridge.queue._postgres_url import masked, scrub

    assert masked(url) == (url if shown is None else shown)
    try:
        parsed = conninfo_to_dict(url) if url.startswith("postgres") else {}
    except psycopg.ProgrammingError:
        parsed = {}  # libpq refuses it: the cases above say what is masked
    secrets = [str(parsed[key]) for key in ("password", "sslpassword") if key in parsed]
    assert secrets or shown is None or "@cret" in url or "/cret" in url
    for secret in secrets:
        assert secret not in masked(url)
        message = f"connection to {url} failed: password {secret!r} refused"
        # scrub() leaves one or two characters alone ("se" of "se@cret"): they reveal nothing.
        assert len(secret) < 3 or secret not in scrub(message, url)


@pytest.mark.parametrize(
    ("url", "error", "shown"),
    [
        # Errors as psycopg words them. The part of a password after an "@" left
        # unencoded is a host to libpq, or a port, or a query parameter.
        (
            "postgresql://bridge:p@S3cr3tTail@127.0.0.1:1/bridge",
            "failed to resolve host 'S3cr3tTail@127.0.0.1': [Errno -2] Name or service not known",
            "failed to resolve host '***@127.0.0.1': [Errno -2] Name or service not known",
        ),
        (
            "postgresql://u:p@S3cr:3tTail@127.0.0.1/db",
            "failed to resolve host 'S3cr': [Errno -8] Servname not supported for ai_socktype",
            "failed to resolve host '***': [Errno -8] Servname not supported for ai_socktype",
        ),
        (
            "postgresql://u:p@127.0.0.1:3tTail@h/db",
            'invalid integer value "3tTail@h" for connection option "port"',
            'invalid integer value "***@h" for connection option "port"',
        ),
        (
            "postgresql://u:p@a,bcd@127.0.0.1:1/db",
            "failed to resolve host 'bcd@127.0.0.1': [Errno -2] Name or service not known",
            "failed to resolve host '***@127.0.0.1': [Errno -2] Name or service not known",
        ),
        (
            "postgresql://u:p@S3cr3t?Tail@h/db",
            'missing key/value separator "=" in URI query parameter: "Tail@h/db"',
            'missing key/value separator "=" in URI query parameter: "***@h/db"',
        ),
        (
            "postgresql://db.example?password=se@cret",
            "failed to resolve host 'cret': [Errno -2] Name or service not known",
            "failed to resolve host '***': [Errno -2] Name or service not known",
        ),
        # A whole password is blanked however short.
        (
            "postgresql://u:pw@h/db",
            'password authentication failed for user "u": pw',
            'password authentication failed for user "u": ***',
        ),
        # libpq's password is "p", a fragment: not worth blanking every "p" of the message.
        (
            "postgresql://bridge:p@S3cr3tTail@127.0.0.1:1/bridge",
            'connection to server at "127.0.0.1", port 1 failed: password authentication failed',
            'connection to server at "127.0.0.1", port 1 failed: password authentication failed',
        ),
    ],
)
def test_postgres_url_scrub_blanks_what_libpq_read_of_a_password(
    url: str, error: str, shown: str
) -> None:
    from bridge.queue._postgres_url import scrub

    assert scrub(error, url) == shown


def test_postgres_queue_error_names_no_part_of_the_password() -> None:
    """libpq refuses the URL (no server needed) and its error quotes the password's tail."""
    pytest.importorskip("psycopg")

    with pytest.raises(QueueUnavailable) as caught:
        asyncio.run(opened("postgresql://bridge:p@S3cr3t?Tail@127.0.0.1:1/bridge"))
    said = str(caught.value)
    assert "S3cr3t" not in said and "Tail" not in said
    assert 'separator "=" in URI query parameter: "***@127.0.0.1:1/bridge"' in said


# Passwords as a user may write them, escaped or not: "*" left out, being the mask itself.
_PASSWORD_CHARS = (
    st.sampled_from("@#?/:&=%[],")
    | st.sampled_from([c for c in string.printable if c.isalnum() or c in "!$'()+-.;<>^_`{|}~"])
    | st.sampled_from(["%40", "%23", "%3F", "%2F", "%3A", "%26", "%3D", "%25", "%00", "%zz"])
)
_PASSWORDS = st.lists(_PASSWORD_CHARS, min_size=1, max_size=12).map("".join)


def _named_parts(password: str) -> list[str]:
    """The parts of ``password`` that libpq may read, and an error name, on their own.

    Up to the first "@" it is libpq's password; each part after an "@" is a host to libpq,
    which then cuts it where a host, port or query parameter ends.
    """
    first, *rest = password.split("@")
    cuts = [cut for part in rest for cut in re.split(r"[:/?,&=\[\]]", part)]
    return [first, *rest, *cuts]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scheme=st.sampled_from(["postgresql://", "postgres://"]),
    user=st.sampled_from(["", "u", "bridge", "user@srv"]),
    in_userinfo=st.none() | _PASSWORDS,
    host=st.sampled_from(["db.example", "127.0.0.1:5432", "[::1]", "[::1]:5433", "h1,h2:5433"]),
    dbname=st.sampled_from(["", "/q"]),
    before=st.sampled_from(["", "sslmode=require&"]),
    in_query=st.none() | _PASSWORDS,
)
def test_postgres_url_password_never_shows_however_it_is_written(
    scheme: str,
    user: str,
    in_userinfo: str | None,
    host: str,
    dbname: str,
    before: str,
    in_query: str | None,
) -> None:
    """Neither masked() nor scrub() shows the password libpq reads, nor a part of it
    that libpq reads as something else (and an error may name)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from bridge.queue._postgres_url import masked, scrub

    def url_with(userinfo_password: str | None, query_password: str | None) -> str:
        userinfo = f"{user}@" if user else ""
        if userinfo_password is not None:
            userinfo = f"{user}:{userinfo_password}@"
        query = "" if query_password is None else f"?{before}password={query_password}"
        return f"{scheme}{userinfo}{host}{dbname}{query}"

    url = url_with(in_userinfo, in_query)
    # What masked() may show: the URL without its passwords, but for a password's parts
    # that are no password to libpq: all of one holding a "/" in the user information
    # (libpq sees none, and reads a host, port and database), what follows an "&" in the query.
    slashed = in_userinfo is not None and "/" in in_userinfo
    skeleton = url_with(
        in_userinfo if slashed or in_userinfo is None else "\n",
        None if in_query is None else "\n" + "".join(in_query.partition("&")[1:]),
    )
    try:
        read = conninfo_to_dict(url)
    except (psycopg.ProgrammingError, UnicodeDecodeError) as exc:  # (psycopg: %XX not UTF-8)
        read, said = {}, str(exc)
    else:  # Every host, port, user and database libpq would name.
        said = " ".join(f"{key} '{value}'" for key, value in read.items() if "password" not in key)
    secret = str(read.get("password", ""))
    message = f"connection to {url} failed: {said}: password '{secret}' refused"
    scrubbed = scrub(message, url)

    if secret and secret not in skeleton:
        assert secret not in masked(url)
    if len(secret) >= 3:  # shorter, it is never blanked: see scrub()
        assert secret not in scrubbed
    parts = _named_parts(in_query.partition("&")[0]) if in_query is not None else []
    if in_userinfo is not None and not slashed:
        parts += _named_parts(in_userinfo)
    for part in parts:
        if len(unquote(part)) >= 3:
            assert part not in scrubbed and unquote(part) not in scrubbed


def _closed_port() -> int:
    from tests.fakes.vela import _free_port

    return _free_port()


def test_postgres_invariants_hold_under_concurrent_replicas(pg_url: str) -> None:
    """Three replicas add, claim, settle, lose leases, restart and cancel at once, for ~2 s."""
    import psycopg

    from bridge.states import delivery_status

    async def main() -> None:
        queues = [await opened(pg_url, lease=0.3) for _ in range(3)]
        stop = time.monotonic() + 2

        def random_delivery() -> NewDelivery:
            return delivery(
                f"d{random.randrange(1000)}",
                repo=random.choice(["a/b", "c/d"]),
                lane=f"l{random.randrange(12)}",
                jobs=random.choice([0, 1, 2]),
            )

        async def producer(q: Queue) -> None:
            while time.monotonic() < stop:
                await asyncio.gather(*(q.add(random_delivery()) for _ in range(10)))
                await asyncio.sleep(0.01)

        async def worker(q: Queue) -> None:
            while time.monotonic() < stop + 1:
                now = time.time()
                jobs = await q.claim(5, now)
                await asyncio.sleep(random.uniform(0, 0.02))
                for job in jobs:
                    if random.random() < 0.05:
                        continue  # this "replica" dies with the claim: its lease runs out
                    state = random.choice([JobState.SUCCESS, JobState.RETRYING, JobState.FAILURE])
                    later = time.time() + 0.05 if state == JobState.RETRYING else 0.0
                    attempt = Attempt(now, 0.01, 201, "", "")
                    outcome = Settlement(state, attempt, next_attempt_at=later)
                    await q.settle(job.id, outcome, now, claim=job.claim)
                if not jobs:
                    await asyncio.sleep(0.01)

        async def operator(q: Queue) -> None:
            while time.monotonic() < stop:
                repo, number = random.choice(["a/b", "c/d"]), random.randrange(1, 200)
                try:
                    if random.random() < 0.5:
                        await q.restart(repo, number, lambda e, p: "no", time.time())
                    else:
                        await q.cancel(repo, number, 1, time.time())
                except (Conflict, NotFound):
                    pass
                await asyncio.sleep(0.005)

        try:
            await asyncio.gather(
                *(producer(q) for q in queues),
                *(worker(q) for q in queues for _ in range(2)),
                *(operator(q) for q in queues),
            )
        finally:
            for q in queues:
                await q.close()

    asyncio.run(main())
    with psycopg.connect(pg_url) as conn:
        jobs = conn.execute("SELECT lane, state, head, delivery_id FROM jobs").fetchall()
        deliveries = conn.execute("SELECT id, status FROM deliveries").fetchall()
    assert len(jobs) > 100
    lanes: dict[str, list[tuple[str, bool]]] = {}
    states: dict[int, list[JobState]] = {}
    for lane, state, head, delivery_id in jobs:
        lanes.setdefault(lane, []).append((state, head))
        states.setdefault(delivery_id, []).append(JobState(state))
    for lane, found in lanes.items():
        active = [s for s, _ in found if s in ("pending", "running", "retrying")]
        heads = [s for s, head in found if head]
        assert len(heads) == (1 if active else 0), (lane, heads, active)
        assert heads == [] or heads[0] in active
        assert [s for s, _ in found].count("running") <= 1, lane
    for delivery_id, status in deliveries:
        assert status == delivery_status(states.get(delivery_id, [])), delivery_id


def test_a_failing_call_does_not_undo_the_others_in_its_batch(url: str) -> None:
    async def main(q: Any) -> list[Any]:
        return await asyncio.gather(
            q.add(delivery("before")),
            q.cancel("Octo/App", 99, 1, time.time()),  # no such build: NotFound
            q.add(delivery("after")),
            return_exceptions=True,
        )

    before, failed, after = run(main, url)
    assert before is Added.QUEUED and after is Added.QUEUED
    assert isinstance(failed, NotFound)


def test_a_refusal_before_any_write_does_not_run_its_batch_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: an operator's 404 amid a burst of deliveries costs the burst nothing: the
    batch is rerun call by call (SAVEPOINTs) only when a failing call may have written."""
    from bridge.queue import _writer

    runs: list[bool] = []
    real = _writer._run_batch

    def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(kwargs.get("isolated", False))
        return real(*args, **kwargs)

    async def main(q: Any) -> list[Any]:
        monkeypatch.setattr(_writer, "_run_batch", counted)
        return await asyncio.gather(
            *(q.add(delivery(f"g{i}")) for i in range(20)),
            q.cancel("Octo/App", 99, 1, time.time()),  # no such build: NotFound
            q.restart("Octo/App", 98, lambda payload: None, time.time()),  # NotFound too
            return_exceptions=True,
        )

    *added, cancelled, restarted = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert added == [Added.QUEUED] * 20
    assert isinstance(cancelled, NotFound) and isinstance(restarted, NotFound)
    assert runs == [False], runs  # one run, not isolated


def test_an_add_returns_only_after_its_batch_was_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the write-ahead log is fdatasync'd after the commit, before the answer."""
    import os

    syncs: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        real(fd)
        syncs.append(fd)

    monkeypatch.setattr(os, "fdatasync", spy)

    async def main(q: Any) -> None:
        for index in range(3):
            before = len(syncs)
            assert await q.add(delivery(f"g{index}")) is Added.QUEUED
            assert len(syncs) > before
        before = len(syncs)
        assert await q.add(delivery("g0")) is Added.DUPLICATE  # nothing written: no sync
        assert len(syncs) == before

    run(main, f"sqlite:///{tmp_path / 'q.db'}")


def test_a_failed_sync_is_a_failed_add(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async def main(q: Any) -> None:
        monkeypatch.setattr(os, "fdatasync", broken)
        with pytest.raises(QueueUnavailable, match="sync"):
            await q.add(delivery("g"))

    run(main, f"sqlite:///{tmp_path / 'q.db'}")


def test_the_next_batch_commits_while_one_syncs_and_a_failed_sync_stops_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: group commit is pipelined. A batch commits while the one before it syncs,
    and is answered only after that sync. A failed sync is fail-stop: the batch behind
    it fails too, and so does everything after, even a redelivery that would otherwise
    be a "duplicate" of a delivery whose sync failed, until the queue is reopened."""
    import os
    import threading

    real = os.fdatasync
    release = threading.Event()
    calls: list[int] = []

    def first_sync_fails(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            release.wait(5)
            raise OSError(5, "Input/output error")
        real(fd)

    async def main(q: Any) -> tuple[list[Any], int, list[Any]]:
        monkeypatch.setattr(os, "fdatasync", first_sync_fails)
        first = asyncio.ensure_future(q.add(delivery("a")))
        while not calls:  # the first batch is committed and its sync has begun
            await asyncio.sleep(0.005)
        second = asyncio.ensure_future(q.add(delivery("b")))
        while commits(q) < 2:  # the second batch commits without waiting for that sync
            await asyncio.sleep(0.005)
        committed_meanwhile = commits(q)
        release.set()
        results = await asyncio.gather(first, second, return_exceptions=True)
        later = await asyncio.gather(
            q.add(delivery("a")), q.add(delivery("c")), q.ping(), return_exceptions=True
        )
        return results, committed_meanwhile, later

    db = f"sqlite:///{tmp_path / 'q.db'}"
    results, committed_meanwhile, later = run(main, db)
    assert committed_meanwhile == 2
    assert all(isinstance(r, QueueUnavailable) for r in results), results
    assert all(isinstance(r, QueueUnavailable) for r in later), later
    assert "restart" in str(later[0])

    async def reopened(q: Any) -> Added:  # recovery: the log holds what it holds
        return await q.add(delivery("c"))

    assert run(reopened, db) is Added.QUEUED


def test_a_commit_that_fails_fails_its_whole_batch_and_the_queue_goes_on(tmp_path: Path) -> None:
    """SQLite: a COMMIT that fails (here on a deferred foreign key, which SQLite checks
    only at COMMIT) is rolled back, every call of its batch fails, nothing of it is
    stored, and the next batch commits as usual."""

    def tables(conn: Any) -> None:
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
        )

    async def main(q: Any) -> tuple[list[Any], list[Any]]:
        writer = q._writer
        await writer.run(tables)
        writer._conn.execute("PRAGMA foreign_keys = ON")  # between batches: nothing in flight
        orphan = writer.run(lambda conn: conn.execute("INSERT INTO child VALUES (1)"))
        failed = await asyncio.gather(q.add(delivery("a")), orphan, return_exceptions=True)
        after = await asyncio.gather(q.add(delivery("a")), q.add(delivery("b")))
        return failed, after

    failed, after = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert all(isinstance(r, QueueUnavailable) for r in failed), failed
    assert "could not commit" in str(failed[0])
    assert after == [Added.QUEUED, Added.QUEUED]  # "a" was not stored by the failed batch


def test_a_committer_that_fails_fails_its_calls_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.queue import _writer

    def bug(*args: Any) -> Any:
        raise RuntimeError("a bug")

    async def main(q: Any) -> list[Any]:
        monkeypatch.setattr(_writer, "_commit", bug)
        first = await asyncio.gather(q.add(delivery("a")), return_exceptions=True)
        await asyncio.sleep(0)  # the committer has ended
        later = await asyncio.gather(q.add(delivery("b")), q.ping(), return_exceptions=True)
        return first + later

    results = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert all(isinstance(r, QueueUnavailable) for r in results), results


def test_the_log_stays_bounded_while_writes_never_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite: past its size limit the write-ahead log is checkpointed whole, commits
    waiting, so that it restarts and is cut back instead of growing without end."""
    import logging

    from bridge.queue import _writer

    caplog.set_level(logging.INFO, logger="bridge.queue")
    limit = 256 * 1024
    monkeypatch.setattr(_writer, "_WAL_LIMIT", limit)
    monkeypatch.setattr(_writer, "_CHECKPOINT_ROWS", 10**9)  # no routine checkpoints
    wal = tmp_path / "q.db-wal"

    async def main(q: Any) -> tuple[int, list[Added]]:
        largest, results = 0, []
        for chunk in range(20):
            results += await asyncio.gather(
                *(q.add(delivery(f"g{chunk}-{i}", lane=f"l{i}")) for i in range(100))
            )
            largest = max(largest, wal.stat().st_size)
        return largest, results

    largest, results = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert results == [Added.QUEUED] * 2000
    assert largest < 2 * limit, f"the log reached {largest} bytes"
    assert any("commits wait for a checkpoint" in r.getMessage() for r in caplog.records)


def test_commits_go_on_past_the_log_limit_while_a_checkpoint_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a checkpoint already running is left to finish with commits flowing;
    commits pause only for the one that copies what was written meanwhile."""
    import threading

    from bridge.queue import _writer

    monkeypatch.setattr(_writer, "_WAL_LIMIT", 256 * 1024)
    monkeypatch.setattr(_writer, "_CHECKPOINT_ROWS", 1)  # every commit starts one if none runs
    hold, release = threading.Event(), threading.Event()
    real = _writer._checkpoint
    held_ones: list[Path] = []

    def held(file: Path) -> None:
        if hold.is_set() and not held_ones:  # the first checkpoint once armed
            held_ones.append(file)
            release.wait(10)
        real(file)

    monkeypatch.setattr(_writer, "_checkpoint", held)
    wal = tmp_path / "q.db-wal"

    async def batches(q: Any) -> list[Added]:
        results: list[Added] = []
        for chunk in range(20):
            adds = (q.add(delivery(f"g{chunk}-{i}", lane=f"l{i}")) for i in range(20))
            results += await asyncio.gather(*adds)
        return results

    async def main(q: Any) -> tuple[list[Added], int]:
        await q.add(delivery("first"))
        while q._writer._checkpoint_running():  # the next one to start is the next batch's
            await asyncio.sleep(0.01)
        assert wal.stat().st_size < 256 * 1024
        hold.set()  # the next checkpoint runs until released
        try:
            results = await asyncio.wait_for(batches(q), timeout=5)
            size = wal.stat().st_size
        finally:
            release.set()
        return results, size

    results, size = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert results == [Added.QUEUED] * 400
    assert size > 256 * 1024  # past the limit, and no commit waited for the held checkpoint


@pytest.mark.parametrize("live_first", [False, True])
def test_an_outcome_from_a_claim_whose_lease_was_retaken_is_only_logged(
    url: str, live_first: bool
) -> None:
    """A worker that outlasts its lease must not record its outcome over the claim that
    took the job again, even when both claims were made through the same queue object,
    and whichever of the two settles first."""

    async def main(q: Queue) -> tuple[list[ClaimedJob], list[bool], JobRecord, list[Attempt]]:
        await q.add(delivery("g"))
        stale = (await q.claim(10, time.time()))[0]
        await asyncio.sleep(0.6)  # the test queue's lease is 0.5 s
        live = (await q.claim(10, time.time()))[0]
        late = time.time()
        failed = Settlement(JobState.FAILURE, Attempt(late, 0.1, 422, "bad", "no"), error="bad")
        settles = [(stale, success(late)), (live, failed)]
        recorded = [
            await q.settle(job.id, outcome, late, claim=job.claim)
            for job, outcome in (settles[::-1] if live_first else settles)
        ]
        job, attempts = await q.job_log("Octo/App", 1, 1)
        return [stale, live], recorded, job, attempts

    claims, recorded, job, attempts = run(main, url, lease=0.5)
    assert [c.guid for c in claims] == ["g", "g"] and claims[0].claim != claims[1].claim
    assert claims[1].unclear
    assert recorded == ([True, False] if live_first else [False, True])
    assert job.state is JobState.FAILURE and job.error == "bad"
    assert sorted(a.http_status or 0 for a in attempts) == [201, 422]  # both are logged


def test_an_outcome_settled_while_its_job_is_being_retaken_is_only_logged(tmp_path: Path) -> None:
    """SQLite: the retaking claim is already queued for the writer when the old claim's
    worker settles: the outcome must not be recorded over the claim about to hold the
    job. (PostgreSQL checks the claim in the same statement that settles, and which of
    the two transactions commits first is the server's to decide: either order holds.)"""

    async def main(q: Queue) -> tuple[list[ClaimedJob], bool, JobRecord]:
        await q.add(delivery("g"))
        stale = (await q.claim(10, time.time()))[0]
        await asyncio.sleep(0.6)  # the test queue's lease is 0.5 s
        retaking = asyncio.create_task(q.claim(10, time.time()))
        await asyncio.sleep(0)  # the claim is sent, not yet answered
        recorded = await q.settle(stale.id, success(time.time()), time.time(), claim=stale.claim)
        live = await retaking
        job, _ = await q.job_log("Octo/App", 1, 1)
        return live, recorded, job

    live, recorded, job = run(main, f"sqlite:///{tmp_path / 'q.db'}", lease=0.5)
    assert [j.guid for j in live] == ["g"] and live[0].unclear
    assert recorded is False
    assert job.state is JobState.RUNNING  # the live claim's, not the stale success


def test_a_settle_and_a_retaking_claim_in_a_batch_run_again_both_hold(tmp_path: Path) -> None:
    """SQLite: a settlement and a claim that takes the job again share a writer batch, and
    another call of the batch fails, so the batch is rolled back and run again call by
    call. The rerun must find what the first run wrote undone, claims included: the
    outcome is recorded and the same claim takes the job again."""

    async def main(q: Any) -> tuple[Any, Any, Any, JobRecord]:
        await q.add(delivery("g"))
        t = time.time()
        [job] = await q.claim(10, t)
        retry_now = Settlement(
            JobState.RETRYING, Attempt(t, 0.1, 429, "busy", ""), next_attempt_at=t + 0.2
        )
        broken = dataclasses.replace(delivery("bad"), payload=object())  # cannot be stored
        recorded, retaken, failed = await asyncio.gather(
            q.settle(job.id, retry_now, t + 0.2, claim=job.claim),
            q.claim(10, t + 0.3),
            q.add(broken),
            return_exceptions=True,
        )
        stored, _ = await q.job_log("Octo/App", 1, 1)
        return recorded, retaken, failed, stored

    recorded, retaken, failed, stored = run(main, f"sqlite:///{tmp_path / 'q.db'}")
    assert isinstance(failed, Exception)  # the call that made the batch run again
    assert recorded is True
    assert [j.guid for j in retaken] == ["g"]
    assert stored.state is JobState.RUNNING and stored.attempts == 1


def test_a_sqlite_file_from_before_claims_were_stored_opens_and_forwards(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"

    async def queue_one(q: Any) -> None:
        await q.add(delivery("g"))

    run(queue_one, url)
    with contextlib.closing(sqlite3.connect(tmp_path / "q.db")) as conn:
        conn.execute("ALTER TABLE jobs DROP COLUMN claim")  # as an older bridge made it

    async def forward(q: Any) -> JobRecord:
        [job] = await q.claim(10, time.time())
        assert await q.settle(job.id, success(time.time()), time.time(), claim=job.claim)
        return (await q.job_log("Octo/App", 1, 1))[0]

    assert run(forward, url).state is JobState.SUCCESS


def test_an_expired_claim_is_taken_again_as_unclear(tmp_path: Path) -> None:
    """SQLite: an attempt that could not settle does not hold its lane past its lease."""

    async def main(q: Any) -> tuple[list[Any], list[Any]]:
        await q.add(delivery("g"))
        now = time.time()
        first = await q.claim(10, now)  # ...and never settled
        again = await q.claim(10, now + 1)  # the test queue's lease is 0.5 s
        return first, again

    first, again = run(main, f"sqlite:///{tmp_path / 'q.db'}", lease=0.5)
    assert [j.guid for j in first] == ["g"] and not first[0].unclear
    assert [j.guid for j in again] == ["g"] and again[0].unclear


def test_closing_while_a_batch_syncs_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    real = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(0.2)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)

    async def main() -> list[Any]:
        q = await opened(f"sqlite:///{tmp_path / 'q.db'}")
        first = asyncio.ensure_future(q.add(delivery("a")))
        await asyncio.sleep(0.05)  # the first batch is syncing now
        second = asyncio.ensure_future(q.add(delivery("b")))
        await asyncio.sleep(0)
        await asyncio.wait_for(q.close(), timeout=5)
        return [await first, await second]

    assert asyncio.run(main()) == [Added.QUEUED, Added.QUEUED]
