"""Two bridge processes on one PostgreSQL queue: kill -9 one mid-forwarding, lose nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.vela import FakeVela, Reply
from tests.support import Bridge
from tests.test_forward import guids_received, push

pytestmark = pytest.mark.slow


@pytest.fixture
def replicas(tmp_path: Path, vela: FakeVela, pg_url: str) -> Iterator[list[Bridge]]:
    """Two bridges, each in its own folder (config, log), both on the test's database."""
    made: list[Bridge] = []

    def make(name: str) -> Bridge:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        # lease 3 s (> vela.timeout_seconds 2): a dead replica's claims are retaken soon.
        bridge = Bridge(workdir, vela.url, queue={"url": with_password(pg_url), "lease_seconds": 3})
        made.append(bridge)
        return bridge

    yield [make("a"), make("b")]
    for bridge in made:
        bridge.kill()
        bridge.client.close()


PASSWORD = "s3cret-in-the-url"


def with_password(url: str) -> str:
    """The URL with a password (the test server trusts loopback, so any password works)."""
    scheme, rest = url.split("://", 1)
    userinfo, at, host = rest.partition("@")
    return f"{scheme}://{userinfo}:{PASSWORD}@{host}" if at else url


def statuses(pg_url: str, guids: list[str]) -> dict[str, str]:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT guid, status FROM deliveries WHERE guid = ANY(%s)", (guids,)
        ).fetchall()
    return {guid: status for guid, status in rows}


def running_jobs(pg_url: str) -> int:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE state = 'running'").fetchone()
    assert row is not None
    return int(row[0])


def wait_all(pg_url: str, guids: list[str], status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        last = statuses(pg_url, guids)
        if len(last) == len(guids) and set(last.values()) == {status}:
            return
        time.sleep(0.1)
    waiting = {g: s for g, s in last.items() if s != status}
    raise AssertionError(f"{len(waiting)} deliveries not {status}: {list(waiting.items())[:5]}")


def builds(bridge: Bridge, repo: str) -> dict[str, int]:
    """Every build of ``repo`` as the operator API of ``bridge`` lists it: GUID → number."""
    found: dict[str, int] = {}
    page = 1
    while True:
        answer = bridge.api(
            "GET", f"/api/repos/{repo}/builds", params={"per_page": 100, "page": page}
        )
        assert answer.status_code == 200, answer.text
        listed: list[dict[str, Any]] = answer.json()
        if not listed:
            return found
        found.update({b["delivery"]: b["number"] for b in listed})
        page += 1


def test_two_replicas_share_the_queue_and_survive_a_kill_9(
    replicas: list[Bridge], vela: FakeVela, pg_url: str
) -> None:
    a, b = replicas
    a.start()
    b.start()
    # Vela is slow (it creates the build, then answers late): work is in flight at the kill.
    vela.always(Reply(create=True, delay=0.2))
    guids = [str(uuid.uuid4()) for _ in range(200)]

    def send(index: int) -> None:
        to = (a, b)[index % 2]  # alternate between the replicas
        answer = to.send("push", push(f"refs/heads/b{index % 8}"), guid=guids[index])
        assert answer.status_code == 202, answer.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(len(guids))))

    a.kill()
    in_flight_at_kill = running_jobs(pg_url)
    received_at_kill = len(vela.posts())
    assert received_at_kill < len(guids), "everything was forwarded before the kill"

    # b alone finishes: its own work, and a's claims once their lease expires.
    wait_all(pg_url, guids, "success", timeout=90)
    received = guids_received(vela)
    assert set(received) == set(guids)
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= in_flight_at_kill, (duplicates, in_flight_at_kill)
    assert duplicates == 0, f"{duplicates} duplicates ({in_flight_at_kill} in flight at the kill)"

    # A redelivery of a GUID that a stored goes to b: a duplicate, forwarded no more.
    again = b.send("push", push(), guid=guids[0])
    assert again.status_code == 200 and again.json()["status"] == "duplicate"

    # a comes back next to b; both number the repository's builds alike.
    a.start()
    repo = "octo-org/web.app"
    from_a, from_b = builds(a, repo), builds(b, repo)
    assert from_a == from_b
    assert set(from_a) == set(guids)
    assert sorted(from_a.values()) == list(range(1, len(guids) + 1))
    one = a.api("GET", f"/api/repos/{repo}/builds/{from_b[guids[7]]}")
    assert one.status_code == 200 and one.json()["delivery"] == guids[7]
    vela.always(None)
    time.sleep(0.5)
    assert guids_received(vela) == received  # nothing more was sent by either
    for bridge in (a, b):
        assert PASSWORD not in bridge.logs()
        assert ":***@" in bridge.logs()  # the start-up line names the queue, masked


def test_a_queue_that_goes_away_is_503_not_a_lost_delivery(
    make_bridge: Any, vela: FakeVela, postgres_server: Any
) -> None:
    """readyz and intake answer 503 while the database cannot be reached."""
    url = postgres_server.create_database()
    bridge = make_bridge(queue={"url": url, "lease_seconds": 3})
    assert bridge.client.get("/readyz").status_code == 200
    assert bridge.send("push", push()).status_code == 202
    postgres_server.drop_database(url)  # FORCE: every connection of the bridge is cut
    ready = bridge.client.get("/readyz")
    assert ready.status_code == 503 and "queue" in ready.json()["reason"]
    refused = bridge.send("push", push())
    assert refused.status_code == 503 and refused.json()["error"]
    assert bridge.client.get("/healthz").status_code == 200
