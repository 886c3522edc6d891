"""Crashes, restarts and shutdown of a real bridge process on a real SQLite file."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

from tests.fakes.vela import FakeVela, Reply
from tests.support import Bridge
from tests.test_forward import guids_received, push


def test_kill_9_with_pending_deliveries_loses_nothing(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge()
    # Vela is slow: some requests are in flight, most are pending, when the bridge dies.
    vela.always(Reply(create=True, delay=0.3))
    guids = [str(uuid.uuid4()) for _ in range(100)]
    for index, guid in enumerate(guids):
        assert bridge.send("push", push(f"refs/heads/b{index % 10}"), guid=guid).status_code == 202
    bridge.kill()
    in_flight_at_kill = len(vela.posts())
    assert in_flight_at_kill < len(guids)
    vela.always(None)

    restarted = make_bridge()
    for guid in guids:
        restarted.wait_status(guid, "success", timeout=30)
    received = guids_received(vela)
    assert set(received) == set(guids)
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates == 0, f"{duplicates} duplicates after kill -9"
    # A redelivery of an old GUID after the restart is still a duplicate.
    again = restarted.send("push", push(), guid=guids[0])
    assert again.status_code == 200 and again.json()["status"] == "duplicate"


def test_second_serve_on_the_same_file_refuses_to_start(bridge: Bridge) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(bridge.config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=bridge.workdir,
    )
    assert second.returncode != 0
    assert "another vela-bridge process is using" in second.stderr
    assert "Traceback" not in second.stderr
    assert bridge.client.get("/readyz").status_code == 200


def test_sigterm_releases_in_flight_work_and_exits_quickly(
    make_bridge: Any, vela: FakeVela
) -> None:
    bridge = make_bridge(vela={"timeout_seconds": 20}, queue={"lease_seconds": 30})
    vela.always(Reply(create=True, delay=15))  # hangs well past the shutdown grace
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    vela.wait_for_posts(1)
    started = time.monotonic()
    # uvicorn exits through the signal it handled (-15), as systemd expects of SIGTERM.
    assert bridge.terminate() in (0, -15)
    assert "Application shutdown complete" in bridge.logs()
    assert time.monotonic() - started < 10
    stored = bridge.delivery(guid)
    assert stored["jobs"][0]["state"] == "retrying"  # released, not left claimed
    assert stored["jobs"][0]["unclear"] == 1
    vela.always(None)
    restarted = make_bridge()
    restarted.wait_status(guid, "success")
    # The request Vela got before the shutdown was found, not sent again.
    assert guids_received(vela) == Counter({guid: 1})
