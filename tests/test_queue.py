"""The SQLite queue on a real file: dedupe, numbering, lanes, claims, group commit, retention."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bridge.errors import QueueLocked
from bridge.queue import Added, Attempt, NewDelivery, NewJob, Settlement
from bridge.queue.sqlite import CLAIM_SQL, SQLiteQueue
from bridge.states import IllegalTransition, JobState

T = TypeVar("T")
DAY = 86_400.0


def run(make: Callable[[SQLiteQueue], Awaitable[T]], path: Path, **options: Any) -> T:
    """Open the queue at ``path``, run ``make(queue)``, close it."""

    async def main() -> T:
        queue = await SQLiteQueue.open(
            str(path),
            lease_seconds=options.get("lease", 60),
            retention_days=options.get("days", 14),
        )
        try:
            return await make(queue)
        finally:
            await queue.close()

    return asyncio.run(main())


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


def test_add_dedupes_on_guid_within_and_across_batches(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> list[Added]:
        together = await asyncio.gather(*(q.add(delivery("same")) for _ in range(5)))
        later = await q.add(delivery("same"))
        return [*together, later]

    results = run(main, tmp_path / "q.db")
    assert results.count(Added.QUEUED) == 1
    assert results.count(Added.DUPLICATE) == 5


def test_skipped_delivery_is_stored_without_jobs(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> tuple[Added, Any]:
        return await q.add(delivery("s", jobs=0)), await q.delivery("s")

    added, stored = run(main, tmp_path / "q.db")
    assert added is Added.SKIPPED
    assert stored.status == "skipped" and stored.error == "not forwarded"
    assert stored.jobs == () and stored.finished_at is not None


def test_numbers_are_per_repository_case_insensitive_and_survive_reopening(tmp_path: Path) -> None:
    async def first(q: SQLiteQueue) -> None:
        await q.add(delivery("a1", repo="Octo/App"))
        await q.add(delivery("b1", repo="other/repo"))
        await q.add(delivery("a2", repo="octo/app"))
        await q.add(delivery("a2", repo="octo/app"))  # a duplicate takes no number

    async def second(q: SQLiteQueue) -> list[int]:
        await q.add(delivery("a3", repo="OCTO/APP"))
        return [(await q.delivery(g)).number for g in ("a1", "a2", "a3", "b1")]

    run(first, tmp_path / "q.db")
    assert run(second, tmp_path / "q.db") == [1, 2, 3, 1]


def test_a_lane_forwards_one_job_at_a_time_in_order(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> list[list[str]]:
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

    assert run(main, tmp_path / "q.db") == [["elsewhere", "first"], ["second"], ["third"], []]


def test_a_retrying_head_holds_its_lane_until_due(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> tuple[list[str], list[str], float | None]:
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

    blocked, later, due = run(main, tmp_path / "q.db")
    assert blocked == []
    assert later == ["first"]
    assert due is not None and due > time.time() + 20


def test_claims_of_a_dead_process_are_released_on_open(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def crash(q: SQLiteQueue) -> None:
        await q.add(delivery("g"))
        assert len(await q.claim(10, time.time())) == 1  # then "dies" holding the claim

    async def reopen(q: SQLiteQueue) -> Any:
        stored = await q.delivery("g")
        claimed = await q.claim(10, time.time())
        return stored, claimed

    run(crash, path)
    stored, claimed = run(reopen, path)
    assert stored.jobs[0].state == "retrying"
    assert stored.jobs[0].unclear
    assert [job.unclear for job in claimed] == [True]


def test_a_second_queue_on_the_same_file_is_refused(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> None:
        with pytest.raises(QueueLocked):
            await SQLiteQueue.open(str(tmp_path / "q.db"), lease_seconds=60, retention_days=14)

    run(main, tmp_path / "q.db")


def test_settling_twice_is_an_illegal_transition(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> None:
        await q.add(delivery("g"))
        now = time.time()
        (job,) = await q.claim(1, now)
        await q.settle(job.id, success(now), now)
        with pytest.raises(IllegalTransition):
            await q.settle(job.id, success(now), now)

    run(main, tmp_path / "q.db")


def test_concurrent_adds_share_commits(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> tuple[int, int]:
        before = q._writer.commits
        results = await asyncio.gather(*(q.add(delivery(f"g{i}")) for i in range(300)))
        assert results == [Added.QUEUED] * 300
        return q._writer.commits - before, len(results)

    commits, adds = run(main, tmp_path / "q.db")
    assert commits < adds / 5, f"{commits} commits for {adds} concurrent deliveries"


def test_claim_reads_an_index_not_the_backlog(tmp_path: Path) -> None:
    run(lambda q: q.ping(), tmp_path / "q.db")
    conn = sqlite3.connect(tmp_path / "q.db")
    plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL, (0, 1)))
    conn.close()
    assert "USING INDEX jobs_ready" in plan
    assert "SCAN j" not in plan and "SCAN jobs" not in plan, plan


def test_retention_drops_bodies_then_rows_keeping_guids_a_week(tmp_path: Path) -> None:
    now = time.time()

    async def main(q: SQLiteQueue) -> list[Any]:
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

    old, ancient, fresh, active, again = run(main, tmp_path / "q.db", days=1)
    assert old is not None and not old.has_payload
    assert ancient is None
    assert fresh.has_payload
    assert active.has_payload and active.jobs[0].has_body
    assert again is Added.DUPLICATE


def test_report_state_says_once_per_change(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> list[bool]:
        return [
            await q.report_state("g", "error"),
            await q.report_state("g", "error"),
            await q.report_state("g", "success"),
            await q.report_state("other", "error"),
        ]

    assert run(main, tmp_path / "q.db") == [True, False, True, True]


def test_one_holder_leads_until_its_lease_expires(tmp_path: Path) -> None:
    async def main(q: SQLiteQueue) -> list[bool]:
        now = time.time()
        return [
            await q.try_lead("sweep", "a", 60, now),
            await q.try_lead("sweep", "b", 60, now + 1),
            await q.try_lead("sweep", "a", 60, now + 2),  # renewal
            await q.try_lead("sweep", "b", 60, now + 63),  # a's lease ran out
            await q.try_lead("sweep", "a", 60, now + 64),
        ]

    assert run(main, tmp_path / "q.db") == [True, False, True, True, False]
