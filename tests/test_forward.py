"""Forwarding to the fake Vela through real processes: retries, outages, order, pauses."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.config import RetryConfig, Secret
from bridge.forward import Forwarder
from bridge.queue import Attempt, JobRecord, NewJob, Queue, open_queue
from bridge.states import ACTIVE, JobState
from bridge.vela import VelaClient
from tests.fakes.vela import FakeVela, Reply
from tests.support import VELA_TOKEN, Bridge, payload
from tests.test_queue import DAY, delivery

PUSH = payload("hand.push.feature-branch.json")


def push(
    ref: str = "refs/heads/main", repo: str = "web.app", sha: str | None = None
) -> dict[str, Any]:
    """A push payload for ``repo`` and ``ref`` with its own head commit."""
    body = copy.deepcopy(PUSH)
    body["ref"] = ref
    body["repository"]["name"] = repo
    body["head_commit"]["id"] = sha or uuid.uuid4().hex + "00000000"
    return body


def guids_received(vela: FakeVela) -> Counter[str]:
    return Counter(p.headers["X-GitHub-Delivery"] for p in vela.posts())


def test_outage_deliveries_arrive_once_when_vela_returns(bridge: Bridge, vela: FakeVela) -> None:
    vela.go_down()
    sent = [str(uuid.uuid4()) for _ in range(20)]
    for index, guid in enumerate(sent):
        assert bridge.send("push", push(f"refs/heads/b{index % 5}"), guid=guid).status_code == 202
    time.sleep(1.0)  # several failed attempts each, with the test's short backoff
    vela.come_up()
    for guid in sent:
        bridge.wait_status(guid, "success")
    assert guids_received(vela) == Counter({guid: 1 for guid in sent})


def test_flapping_vela_under_concurrent_load(bridge: Bridge, vela: FakeVela) -> None:
    stop = threading.Event()

    def flap() -> None:
        while not stop.is_set():
            vela.go_down()
            time.sleep(0.05)
            vela.come_up()
            time.sleep(0.1)

    flapper = threading.Thread(target=flap)
    flapper.start()
    guids = [str(uuid.uuid4()) for _ in range(200)]
    try:
        with ThreadPoolExecutor(16) as pool:
            codes = list(
                pool.map(
                    lambda ig: (
                        Bridge.send(
                            bridge, "push", push(f"refs/heads/b{ig[0] % 40}"), guid=ig[1]
                        ).status_code
                    ),
                    enumerate(guids),
                )
            )
        time.sleep(0.5)
    finally:
        stop.set()
        flapper.join()
    vela.come_up() if vela._runner is None else None
    assert codes == [202] * len(guids)
    for guid in guids:
        bridge.wait_status(guid, "success", timeout=30)
    received = guids_received(vela)
    assert set(received) == set(guids)
    assert [g for g, n in received.items() if n > 1] == []


def test_permanent_4xx_is_one_request_then_failure(bridge: Bridge, vela: FakeVela) -> None:
    vela.script(Reply(422, {"error": "unable to create build: bad branch"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    stored = bridge.wait_status(guid, "failure")
    time.sleep(0.3)
    assert len(vela.posts()) == 1
    assert "bad branch" in stored["error"]
    assert stored["jobs"][0]["exit_code"] == 422


def test_retry_after_is_honoured(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(retry={"initial_backoff_seconds": 0.05, "max_backoff_seconds": 5})
    vela.script(Reply(429, {"error": "slow down"}, headers={"Retry-After": "1"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "success")
    first, second = vela.posts()
    assert second.at - first.at >= 1.0


def test_retries_stop_after_max_attempts(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(retry={"max_attempts": 3})
    vela.always(Reply(503, {"error": "down for maintenance"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    stored = bridge.wait_status(guid, "failure")
    time.sleep(0.5)
    assert len(vela.posts()) == 3
    assert stored["jobs"][0]["attempts"] == 3
    assert "3 attempts" in stored["error"]


def test_retries_stop_after_max_age(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(retry={"max_age_seconds": 0.5, "max_attempts": 1000})
    vela.always(Reply(500, {"error": "boom"}))
    guid = str(uuid.uuid4())
    start = time.time()
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "failure")
    assert 2 <= len(vela.posts()) < 20
    assert time.time() - start < 5


def test_no_retry_is_sent_past_max_age(make_bridge: Any, vela: FakeVela) -> None:
    """interface.md: a job fails once it has been retrying for retry.max_age_seconds, not
    before; and a retry that comes due after that is not sent (it could make a build up to
    max_backoff late): the job fails then, with its latest error."""
    bridge = make_bridge(
        retry={
            "max_age_seconds": 1.0,
            "max_attempts": 25,
            "initial_backoff_seconds": 2.0,
            "max_backoff_seconds": 2.0,
        }
    )
    vela.script(Reply(503, {"error": "busy"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    stored = bridge.wait_status(guid, "failure")
    [post] = vela.posts()
    # Failed when its retry came due (2 s, no jitter at the cap), not with the attempt.
    assert stored["jobs"][0]["finished_at"] - post.at >= 1.9
    assert stored["error"] == "gave up after 1 attempts / 1 s: Vela answered 503: busy"
    assert stored["jobs"][0]["attempts"] == 1


def test_an_unclear_job_past_max_age_is_looked_up_before_it_fails(
    make_bridge: Any, vela: FakeVela
) -> None:
    """Its last attempt may have made the build (a gateway's 503 after Vela took it): past
    its max age it is not sent again, but found, it is a success, not a failure."""
    bridge = make_bridge(
        retry={"max_age_seconds": 1.0, "initial_backoff_seconds": 2.0, "max_backoff_seconds": 2.0}
    )
    vela.script(Reply(503, {"error": "upstream reset before headers"}, create=True))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    stored = bridge.wait_status(guid, "success")
    assert len(vela.posts()) == 1
    assert stored["jobs"][0]["vela_number"] == 1


def test_time_paused_on_a_refused_token_does_not_count_towards_max_age(
    make_bridge: Any, vela: FakeVela
) -> None:
    """interface.md: a 401 or 403 fails nothing. A job that waited out a pause longer than
    retry.max_age_seconds is still retried on its first transient error after it."""
    bridge = make_bridge(
        vela={"auth_retry_seconds": 0.3}, retry={"max_age_seconds": 1.5, "max_attempts": 10}
    )
    vela.always(Reply(401, {"error": "token expired"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    time.sleep(2.0)  # paused longer than max_age
    assert vela.posts() and bridge.delivery(guid)["status"] == "running"
    vela.always(None)
    vela.script(Reply(503, {"error": "busy"}))
    stored = bridge.wait_status(guid, "success")
    assert stored["jobs"][0]["attempts"] == 2  # the 503 and the success; no 401 counted


def test_a_pause_after_a_transient_error_does_not_age_the_job(
    make_bridge: Any, vela: FakeVela
) -> None:
    """A job that failed once (503), then probed the token through a pause longer than
    retry.max_age_seconds, is retried on its first transient error after the pause: the
    pause is no part of its age (it used to fail: "gave up after 2 attempts")."""
    bridge = make_bridge(
        vela={"auth_retry_seconds": 0.3},
        retry={
            "max_age_seconds": 1.5,
            "max_attempts": 10,
            "initial_backoff_seconds": 0.2,
            "max_backoff_seconds": 0.2,
        },
    )
    vela.script(Reply(503, {"error": "busy"}))  # attempt 1: transient, consumed
    vela.always(Reply(401, {"error": "token expired"}))  # then the token expires
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    time.sleep(2.0)  # paused longer than max_age
    stored = bridge.delivery(guid)
    assert (stored["status"], stored["jobs"][0]["attempts"]) == ("running", 1)
    assert len(vela.posts()) >= 4  # the 503, then probes
    vela.script(Reply(503, {"error": "busy"}))  # the next probe: taken, but busy
    vela.always(None)
    stored = bridge.wait_status(guid, "success")
    assert stored["jobs"][0]["attempts"] == 3  # 503, 503, 201


def test_a_job_that_waited_out_a_pause_is_not_aged_by_it(make_bridge: Any, vela: FakeVela) -> None:
    """Not only the job that probes the token: one that waited (its retry was not due
    during the pause) has the pause taken out of its age too. Its second 503 asks for
    1.6 s more, 5.6 s after its first attempt: past the 5.5 s max age, unless the ~2.5 s
    paused meanwhile are taken out. (Without that, it failed then, or at the attempt
    after.)"""
    bridge = make_bridge(
        vela={"auth_retry_seconds": 0.3},
        retry={"max_age_seconds": 5.5, "initial_backoff_seconds": 0.1, "max_backoff_seconds": 5},
    )
    slow = f"{PUSH['repository']['owner']['login']}/slow"
    vela.always(Reply(503, {"error": "busy"}, headers={"Retry-After": "4"}), repo=slow)
    waiting = str(uuid.uuid4())
    bridge.send("push", push(repo="slow"), guid=waiting)
    [first] = vela.wait_for_posts(1)
    vela.token = "rotated"  # the token expires; another delivery finds out
    probing = str(uuid.uuid4())
    bridge.send("push", push(), guid=probing)
    wait_ready(bridge, 503)
    vela.always(None, repo=slow)
    vela.script(  # for the POSTs the renewed token lets through, in order
        Reply(201, {"number": 7}),  # the probing job's
        Reply(503, {"error": "busy"}, headers={"Retry-After": "1.6"}),  # the waiting job's
        Reply(503, {"error": "busy"}),
    )
    time.sleep(max(0.0, first.at + 2.5 - time.time()))
    vela.token = VELA_TOKEN  # renewed: the probing job goes through, forwarding resumes
    bridge.wait_status(probing, "success")
    assert [p.path.endswith("/slow/builds") for p in vela.posts()].count(True) == 1  # waited
    stored = bridge.wait_status(waiting, "success")
    assert stored["jobs"][0]["attempts"] == 4  # 503, 503, 503, 201
    assert vela.posts()[-1].at - first.at > 5.5


def test_vela_skips_are_skipped(bridge: Bridge, vela: FakeVela) -> None:
    vela.script(
        Reply(200, "no steps to run for this event"),
        Reply(400, {"error": "repo octo-org/web.app does not have push events enabled"}),
    )
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    bridge.send("push", push("refs/heads/a"), guid=first)
    assert "no steps" in bridge.wait_status(first, "skipped")["error"]
    bridge.send("push", push("refs/heads/b"), guid=second)
    assert "does not have push events enabled" in bridge.wait_status(second, "skipped")["error"]


def test_same_ref_is_forwarded_in_order_behind_a_retry(bridge: Bridge, vela: FakeVela) -> None:
    vela.script(Reply(500, {"error": "hiccup"}), Reply(500, {"error": "hiccup"}))
    guids = [str(uuid.uuid4()) for _ in range(5)]
    for guid in guids:
        bridge.send("push", push("refs/heads/main"), guid=guid)
    for guid in guids:
        bridge.wait_status(guid, "success")
    successes = [p.headers["X-GitHub-Delivery"] for p in vela.posts()][2:]
    assert successes == guids


def test_other_lanes_flow_while_one_retries(bridge: Bridge, vela: FakeVela) -> None:
    vela.always(
        Reply(500, {"error": "this repo is broken"}),
        repo=f"{PUSH['repository']['owner']['login']}/stuck",
    )
    stuck = str(uuid.uuid4())
    bridge.send("push", push(repo="stuck"), guid=stuck)
    others = [str(uuid.uuid4()) for _ in range(5)]
    for guid in others:
        bridge.send("push", push(repo="flowing"), guid=guid)
    for guid in others:
        bridge.wait_status(guid, "success")
    assert bridge.delivery(stuck)["status"] == "running"


def test_timeout_after_sending_looks_up_before_resending(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(vela={"timeout_seconds": 0.5}, queue={"lease_seconds": 5})
    vela.script(Reply(create=True, delay=1.5))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    stored = bridge.wait_status(guid, "success")
    assert len(vela.posts()) == 1
    lookups = [r for r in vela.requests if r.method == "GET"]
    assert lookups and lookups[0].query["event"] == "push"
    assert stored["jobs"][0]["vela_number"] == 1


def test_refused_token_pauses_without_consuming_attempts(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(vela={"auth_retry_seconds": 0.5}, retry={"max_attempts": 2})
    vela.always(Reply(401, {"error": "token expired"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    deadline = time.monotonic() + 10
    while len(vela.posts()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = bridge.client.get("/readyz")
    assert ready.status_code == 503
    assert "token" in ready.json()["reason"]
    stored = bridge.delivery(guid)
    assert stored["status"] == "running" and stored["jobs"][0]["attempts"] == 0
    vela.always(None)
    bridge.wait_status(guid, "success")
    assert bridge.client.get("/readyz").status_code == 200


def test_a_paused_bridge_probes_once_per_interval(make_bridge: Any, vela: FakeVela) -> None:
    """New deliveries and settled probes do not shorten the wait between token probes."""
    bridge = make_bridge(vela={"auth_retry_seconds": 1})
    vela.always(Reply(401, {"error": "token expired"}))
    started = time.monotonic()
    for index in range(10):
        bridge.send("push", push(f"refs/heads/b{index}"))
        time.sleep(0.25)
    elapsed = time.monotonic() - started
    # The first attempts (before the pause takes hold) plus one probe a second.
    assert len(vela.posts()) <= 4 + elapsed, len(vela.posts())
    assert bridge.client.get("/readyz").status_code == 503


def wait_ready(bridge: Bridge, status: int, timeout: float = 10.0) -> float:
    """Poll /readyz until it answers ``status``; how long that took."""
    started = time.monotonic()
    while (code := bridge.client.get("/readyz").status_code) != status:
        assert time.monotonic() - started < timeout, f"/readyz still {code}, not {status}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_pause_with_no_job_left_to_probe_ends_once_vela_takes_the_token(
    make_bridge: Any, vela: FakeVela
) -> None:
    """The operator cancels the job that paused forwarding: with nothing due, each probe
    asks Vela for the token's user. Refused, it stays paused; taken, it resumes within
    a probe or two, and forwarding works again."""
    bridge = make_bridge(vela={"auth_retry_seconds": 0.5})
    vela.token = "rotated"  # the bridge's token no longer works
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    wait_ready(bridge, 503)
    repo = bridge.delivery(guid)["repo"]
    deadline = time.monotonic() + 10
    while (cancel := bridge.api("DELETE", f"/api/repos/{repo}/logs/1/1")).status_code == 409:
        assert time.monotonic() < deadline  # 409 while the job is being probed
        time.sleep(0.05)
    assert cancel.status_code == 200 and cancel.json()["status"] == "killed"
    checked = len(vela.requests)
    time.sleep(1.2)  # two probes, both refused
    probes = [(r.method, r.path) for r in vela.requests[checked:]]
    assert probes and set(probes) == {("GET", "/api/v1/user")}, probes
    reason = bridge.client.get("/readyz").json()["reason"]
    assert reason == "Vela refused the token: unauthorized"
    vela.token = VELA_TOKEN  # renewed
    assert wait_ready(bridge, 200) < 1.5  # the next probe (0.5 s) or the one after
    later = str(uuid.uuid4())
    bridge.send("push", push(), guid=later)
    assert bridge.wait_status(later, "success")["jobs"][0]["vela_number"] is not None


def test_a_job_refused_while_the_token_is_good_keeps_probing_once_per_interval(
    tmp_path: Path, vela: FakeVela
) -> None:
    """A 403 on one repository (the token's user is not admin there) while the token
    itself is good: the job stays the probe, once per interval. The token check is for a
    probe with no job due only; a pause that begins while a claim made at full speed is
    under way (here every claim takes 50 ms) does not ask it, resume at once, and loop
    through 403s."""
    vela.always(Reply(403, {"error": "user is not an admin of the repo"}))

    async def main() -> tuple[float, str | None]:
        queue = await open_queue(
            f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=60, retention_days=1
        )
        claim = queue.claim

        async def slow_claim(limit: int, now: float) -> list[Any]:
            await asyncio.sleep(0.05)
            return await claim(limit, now)

        queue.claim = slow_claim  # type: ignore[method-assign]
        client = VelaClient(vela.url, Secret(vela.token), timeout=10, connections=4)
        await client.open()
        forwarder = Forwarder(queue, client, RetryConfig(), concurrency=4, probe_seconds=0.5)
        try:
            await queue.add(delivery("g"))
            forwarder.start()
            started = time.monotonic()
            await asyncio.sleep(2.0)
            await forwarder.stop(grace=1)
            return time.monotonic() - started, forwarder.paused_reason
        finally:
            await client.close()
            await queue.close()

    elapsed, paused = asyncio.run(main())
    assert paused == "Vela refused the token: user is not an admin of the repo"
    assert [r.path for r in vela.requests if r.method == "GET"] == []
    assert len(vela.posts()) <= 1 + elapsed / 0.5, len(vela.posts())


def test_a_lookup_vela_answers_ends_the_pause(make_bridge: Any, vela: FakeVela) -> None:
    """A job left unclear (its answer came too late) probes the token with its lookup:
    once Vela answers it (and the build is found), forwarding resumes with it, not at
    some later probe, and nothing is sent twice."""
    bridge = make_bridge(
        vela={"timeout_seconds": 0.5, "auth_retry_seconds": 1}, queue={"lease_seconds": 5}
    )
    vela.script(Reply(create=True, delay=1.5))  # Vela creates the build, answers too late
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    vela.wait_for_posts(1)
    vela.token = "rotated"  # expires before the lookup
    wait_ready(bridge, 503)
    vela.token = VELA_TOKEN
    bridge.wait_status(guid, "success")
    # At once: the job probed with its lookup, so no probe is due for a second (and none
    # would find a job to try: the token check would be the only way back).
    assert bridge.client.get("/readyz").status_code == 200
    assert len(vela.posts()) == 1
    assert not [r for r in vela.requests if r.path == "/api/v1/user"]
    later = str(uuid.uuid4())
    bridge.send("push", push(), guid=later)
    bridge.wait_status(later, "success")


def test_stop_ends_an_attempt_whose_lease_was_retaken(tmp_path: Path, vela: FakeVela) -> None:
    """An attempt that outlasts its lease, and whose job the same Forwarder took again,
    is waited for and then cancelled by stop() like the latest one: nothing is left
    running against the closed queue, and only the latest claim is released."""
    vela.always(Reply(201, {"number": 1}, delay=5.0))  # longer than the lease and the grace

    async def main() -> tuple[list[str], JobState, bool]:
        queue = await open_queue(
            f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=0.5, retention_days=1
        )
        client = VelaClient(vela.url, Secret(vela.token), timeout=10, connections=4)
        await client.open()
        forwarder = Forwarder(queue, client, RetryConfig(), concurrency=4)
        try:
            await queue.add(delivery("g"))
            forwarder.start()
            deadline = time.monotonic() + 10
            while len(vela.requests) < 2 and time.monotonic() < deadline:  # taken again
                await asyncio.sleep(0.05)
            await forwarder.stop(grace=0.2)
            left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("job-")]
            job, _ = await queue.job_log("Octo/App", 1, 1)
            return left, job.state, job.unclear
        finally:
            await client.close()
            await queue.close()

    left, state, unclear = asyncio.run(main())
    assert len(vela.requests) >= 2  # the job really was claimed twice
    assert left == []
    assert state is JobState.RETRYING and unclear  # released: looked up in Vela before resending


def test_an_attempt_ends_before_its_lease_so_a_job_is_never_in_flight_twice(
    tmp_path: Path, vela: FakeVela
) -> None:
    """An attempt can outlast the lease although each request is within vela.timeout_seconds
    (a deployment check, a lookup and the send each take one): it is cut short before the
    lease ends, as unclear, so the job is never taken again while its attempt still runs."""
    vela.script(Reply(201, {"number": 1}, delay=3.0))  # slow, within the client's timeout

    async def main() -> tuple[JobState, list[Any]]:
        queue = await open_queue(
            f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=1.5, retention_days=1
        )
        client = VelaClient(vela.url, Secret(vela.token), timeout=10, connections=4)
        await client.open()
        retry = RetryConfig(initial_backoff_seconds=0.1)
        forwarder = Forwarder(queue, client, retry, concurrency=4, lease_seconds=1.5)
        try:
            await queue.add(delivery("g"))
            forwarder.start()
            await job_reaches(queue, lambda job: job.state is JobState.SUCCESS)
            await forwarder.stop(grace=5)
            job, attempts = await queue.job_log("Octo/App", 1, 1)
            return job.state, attempts
        finally:
            await client.close()
            await queue.close()

    state, attempts = asyncio.run(main())
    assert state is JobState.SUCCESS
    for one, following in itertools.pairwise(attempts):  # one at a time
        assert one.started_at + one.duration <= following.started_at, attempts
    first, *later = attempts
    assert first.error == "the attempt did not end within 1.35 s of its claim"
    assert first.duration < 1.5
    assert later and later[-1].http_status == 201


async def job_reaches(
    queue: Queue, done: Callable[[JobRecord], bool], timeout: float = 10.0
) -> tuple[JobRecord, list[Attempt]]:
    """The first job of Octo/App #1 and its attempts once ``done`` holds of it, or as they
    are after ``timeout`` s (the caller's assertions then say what went wrong)."""
    deadline = time.monotonic() + timeout
    while True:
        job, attempts = await queue.job_log("Octo/App", 1, 1)
        if done(job) or time.monotonic() > deadline:
            return job, attempts
        await asyncio.sleep(0.05)


def _forward_after_a_slow_claim(
    tmp_path: Path, vela: FakeVela, *, lease: float, hold: float
) -> tuple[JobRecord, list[Any]]:
    """Forward one job whose first claim waits ``hold`` s after taking its time (``now``)
    for SQLite's write lock, which another connection holds: a slow claim, as a busy
    disk or writer makes one. Returns the job and its attempts once it succeeded."""
    db = tmp_path / "q.db"
    body = {"commit": "c0ffee" * 6 + "abcd", "event": "push", "ref": "refs/heads/main"}
    job = NewJob(
        "builds", "Octo", "App", "/api/v1/repos/Octo/App/builds", orjson.dumps(body), "main"
    )
    locked = threading.Event()

    def hold_write_lock() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(hold)
            conn.execute("COMMIT")
        finally:
            conn.close()

    async def main() -> tuple[JobRecord, list[Any]]:
        queue = await open_queue(f"sqlite:///{db}", lease_seconds=lease, retention_days=1)
        client = VelaClient(vela.url, Secret(vela.token), timeout=10, connections=4)
        await client.open()
        retry = RetryConfig(initial_backoff_seconds=0.1)
        forwarder = Forwarder(queue, client, retry, concurrency=4, lease_seconds=lease)
        locker = threading.Thread(target=hold_write_lock)
        try:
            await queue.add(dataclasses.replace(delivery("g"), jobs=(job,)))
            locker.start()
            assert await asyncio.to_thread(locked.wait, 5)
            forwarder.start()  # claims at once, and then waits for the lock
            await job_reaches(queue, lambda job: job.state is JobState.SUCCESS)
            await forwarder.stop(grace=5)
            return await queue.job_log("Octo/App", 1, 1)
        finally:
            await asyncio.to_thread(locker.join)
            await client.close()
            await queue.close()

    return asyncio.run(main())


def test_an_attempt_is_cut_at_its_claims_time_plus_90_percent_of_the_lease(
    tmp_path: Path, vela: FakeVela
) -> None:
    """The lease runs from the time the claim was made with, and so does the attempt's
    deadline: a claim that took 1 s of a 1.5 s lease leaves its attempt 0.35 s, not
    1.35 s, so the job is not taken again while its request is in flight."""
    vela.script(Reply(201, {"number": 1}, delay=3.0, create=True))  # made; answered late
    job, attempts = _forward_after_a_slow_claim(tmp_path, vela, lease=1.5, hold=1.0)

    assert job.state is JobState.SUCCESS and job.vela_number == 1  # found by the lookup
    assert len(vela.posts()) == 1
    assert job.started_at is not None  # the time the first claim was made with
    first = attempts[0]
    ended = first.started_at + first.duration
    assert first.started_at - job.started_at > 0.8, "the claim was not slow"
    assert ended <= job.started_at + 1.35 + 0.1, (first, job.started_at)
    assert first.error == "the attempt did not end within 1.35 s of its claim"
    # While the first attempt was under way nothing but its own POST reached Vela: the
    # job was not claimed (and looked up, or sent) again before it ended.
    during = [r.method for r in vela.requests if r.at < ended]
    assert during == ["POST"], vela.requests


def test_a_claim_too_late_to_use_sends_nothing_and_runs_out(
    tmp_path: Path, vela: FakeVela, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim that returns after 90 % of its lease (here 1.3 s of 1 s) sends nothing and
    settles nothing: the job is taken again as its lease runs out, looked up (unclear)
    and sent once, by one attempt at a time."""
    job, attempts = _forward_after_a_slow_claim(tmp_path, vela, lease=1.0, hold=1.3)

    assert job.state is JobState.SUCCESS and job.vela_number == 1
    assert len(vela.posts()) == 1  # the build was made once
    assert [r.method for r in vela.requests] == ["GET", "POST"]  # unclear: looked up first
    assert job.started_at is not None
    assert vela.requests[0].at - job.started_at > 1.0  # after the first claim's lease
    assert [a.http_status for a in attempts] == [201], attempts  # the late claim left none
    late = [r for r in caplog.records if r.name == "bridge.forward" and "not sent" in r.message]
    assert len(late) == 1 and "left for its lease to run out" in late[0].message


def test_after_a_crash_the_lookup_ignores_an_older_deployment_of_the_same_ref(
    tmp_path: Path, vela: FakeVela
) -> None:
    """A job claimed by a process that died before sending is looked up in Vela on restart,
    as unclear. Yesterday's deployment of the same ref to the same environment (same
    fields) is not what this run sent: the deployment is still requested, once."""
    request = {"ref": "main", "target": "production", "task": "deploy", "description": "ship"}
    yesterday = {**request, "id": 4000, "number": 4000, "created_at": int(time.time()) - DAY}
    vela.deployments["Octo/App"] = {4000: yesterday}
    job = NewJob("deployments", "Octo", "App", "/api/v1/deployments/Octo/App",
                 orjson.dumps(request), "octo/app deploy:production")  # fmt: skip
    new = dataclasses.replace(delivery("deploy"), github_event="deployment", jobs=(job,))
    url = f"sqlite:///{tmp_path / 'q.db'}"

    async def crash() -> None:
        queue = await open_queue(url, lease_seconds=60, retention_days=1)
        await queue.add(new)
        assert await queue.claim(1, time.time())  # and then the process dies
        await queue.close()

    async def restart() -> tuple[JobState, int | None]:
        queue = await open_queue(url, lease_seconds=60, retention_days=1)  # releases the claim
        client = VelaClient(vela.url, Secret(vela.token), timeout=10, connections=4)
        await client.open()
        forwarder = Forwarder(queue, client, RetryConfig(), concurrency=4)
        try:
            forwarder.start()
            found, _ = await job_reaches(queue, lambda job: job.state not in ACTIVE)
            await forwarder.stop(grace=5)
            return found.state, found.vela_number
        finally:
            await client.close()
            await queue.close()

    asyncio.run(crash())
    state, number = asyncio.run(restart())
    assert [r.method for r in vela.requests] == ["GET", "POST"]  # the lookup, then the send
    assert state is JobState.SUCCESS
    assert number in vela.deployments["Octo/App"] and number != 4000  # a new deployment


def test_a_bug_in_an_attempt_is_a_failed_attempt_not_a_hot_loop(
    tmp_path: Path, vela: FakeVela, caplog: Any
) -> None:
    """An attempt that raises something unforeseen backs off like any failed attempt and
    ends as a failure after retry.max_attempts, instead of being claimed again at once."""

    class Broken(Forwarder):
        async def _target(self, job: Any) -> tuple[str, str, bytes]:
            raise RuntimeError("a bug")

    async def main() -> tuple[str, str, int]:
        queue = await open_queue(
            f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=60, retention_days=1
        )
        client = VelaClient(vela.url, Secret(vela.token), timeout=10, connections=4)
        await client.open()
        retry = RetryConfig(max_attempts=3, initial_backoff_seconds=0.2)
        forwarder = Broken(queue, client, retry, concurrency=4)
        try:
            await queue.add(delivery("g"))
            forwarder.start()
            deadline = time.monotonic() + 10
            while (d := await queue.delivery("g")) is not None and d.status != "failure":
                assert time.monotonic() < deadline, d.status
                await asyncio.sleep(0.05)
            await forwarder.stop(grace=1)
            job, _ = await queue.job_log("Octo/App", 1, 1)
            return job.state, job.error, job.attempts
        finally:
            await client.close()
            await queue.close()

    state, error, attempts = asyncio.run(main())
    assert (state, attempts) == ("failure", 3)
    assert (
        error
        == "gave up after 3 attempts: the bridge failed on this job (RuntimeError); see its log"
    )
    assert vela.requests == []
    logged = [r for r in caplog.records if r.getMessage() == "job 1 failed unexpectedly"]
    assert len(logged) == 3 and logged[0].exc_info is not None
