"""Crashes, restarts and shutdown of a real bridge process on a real SQLite file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.fakes.vela import FakeVela, Reply, _free_port
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


def test_the_start_up_check_keeps_the_lock_until_the_server_runs(make_bridge: Any) -> None:
    """Nothing can take the queue file between ``serve``'s check and its lifespan: the
    check's lock is the one the queue keeps (it used to let go of it, so that a second
    serve started at the same moment could slip in and crash one with a traceback)."""
    bridge = make_bridge(start=False).start(wait=False)
    deadline = time.monotonic() + 15
    while "listening on" not in bridge.logs():  # printed after the check, before the lifespan
        assert time.monotonic() < deadline, bridge.logs()
        time.sleep(0.001)
    fd = os.open(bridge.db.with_name(bridge.db.name + ".lock"), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    bridge.wait_ready()
    assert "Traceback" not in bridge.logs()


def test_of_two_serves_started_together_one_serves_and_one_refuses_cleanly(
    make_bridge: Any,
) -> None:
    config = make_bridge(start=False).config
    ports = [_free_port(), _free_port()]
    outputs = [config.with_name(f"serve-{port}.log") for port in ports]
    serve = [sys.executable, "-m", "bridge", "serve", "--config", str(config), "--port"]
    processes = []
    for port, output in zip(ports, outputs, strict=True):
        with output.open("wb") as out:
            processes.append(
                subprocess.Popen(
                    [*serve, str(port)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=config.parent,
                )
            )
    try:
        deadline = time.monotonic() + 30
        while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        exited = [i for i, p in enumerate(processes) if p.poll() is not None]
        assert len(exited) == 1, [o.read_text() for o in outputs]
        loser, winner = exited[0], 1 - exited[0]
        refusal = outputs[loser].read_text()
        assert processes[loser].returncode == 2, refusal
        assert refusal.startswith("vela-bridge: another vela-bridge process is using")
        assert len(refusal.strip().splitlines()) == 1, refusal  # one line, no traceback
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{ports[winner]}/readyz").status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError(outputs[winner].read_text())
        assert processes[winner].poll() is None
        assert "Traceback" not in outputs[winner].read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


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


# The bridge with fdatasync failing (EIO) once a marker file exists. A disk error cannot
# be had on demand, so it is injected at the system call; the rest is the real process.
_SYNC_FAILS_ONCE_MARKED = """
import os, sys
from pathlib import Path

marker, synced = Path(sys.argv.pop(1)), os.fdatasync


def fdatasync(fd):
    if marker.exists():
        raise OSError(5, "Input/output error")
    synced(fd)


os.fdatasync = fdatasync
from bridge.cli import main

sys.exit(main())
"""


def test_shutdown_after_a_failed_sync_still_runs_every_step(
    make_bridge: Any, vela: FakeVela
) -> None:
    """After a failed sync the queue refuses everything (fail-stop), so the in-flight
    claim cannot be released at shutdown: that is logged in one line, and the steps after
    it (clients, the queue) still run; the claim is released when the bridge restarts."""
    bridge = make_bridge(start=False, vela={"timeout_seconds": 20}, queue={"lease_seconds": 30})
    marker = bridge.workdir / "fail-sync"
    bridge.command = [sys.executable, "-c", _SYNC_FAILS_ONCE_MARKED, str(marker)]
    bridge.start()
    vela.always(Reply(create=True, delay=15))  # in flight through the shutdown's grace
    guid = str(uuid.uuid4())
    assert bridge.send("push", push(), guid=guid).status_code == 202
    vela.wait_for_posts(1)
    marker.touch()
    assert bridge.send("push", push()).status_code == 503  # its sync failed
    ready = bridge.client.get("/readyz")
    assert ready.status_code == 503 and "restart" in ready.json()["reason"]

    assert bridge.terminate() in (0, -15)
    logs = bridge.logs()
    assert "Application shutdown complete" in logs, logs  # the lifespan ended without raising
    assert "Traceback" not in logs and "Application shutdown failed" not in logs, logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    failures = [line for line in lines if line["message"].startswith("shutdown: ")]
    assert len(failures) == 1, failures  # the later steps ran, and did not fail
    assert failures[0]["level"] == "error" and "exception" not in failures[0]
    assert failures[0]["message"].startswith("shutdown: stopping forwarding failed: the queue")
    assert bridge.delivery(guid)["jobs"][0]["state"] == "running"  # left claimed

    vela.always(None)
    restarted = make_bridge()
    restarted.wait_status(guid, "success")
