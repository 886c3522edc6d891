"""Operations: /metrics after a known sequence, /healthz, and secrets never in the logs."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.signature import sign
from tests.fakes.vela import FakeVela, Reply
from tests.support import OPERATOR_TOKEN, OTHER_SECRET, SECRET, VELA_TOKEN, Bridge, payload
from tests.test_forward import push

ROOT = Path(__file__).parent.parent


def scrape(bridge: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = bridge.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_known_sequence(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(server={"max_body_bytes": 20_000})
    vela.script(Reply(201, {"id": 1, "number": 1}), Reply(422, {"error": "bad pipeline"}))
    ok, failed = str(uuid.uuid4()), str(uuid.uuid4())
    assert bridge.send("push", push("refs/heads/a"), guid=ok).status_code == 202
    assert bridge.send("push", push("refs/heads/b"), guid=failed).status_code == 202
    assert bridge.send("push", push(), guid=ok).json()["status"] == "duplicate"
    assert bridge.send("issue_comment", payload("issue_comment.created.1.json")).status_code == 200
    assert bridge.send("ping", payload("ping.1.json")).status_code == 200
    assert bridge.send("push", push(), secret="wrong").status_code == 401
    assert bridge.send("push", {"ref": "refs/heads/x"}).status_code == 400
    assert bridge.send("push", {**push(), "padding": "x" * 30_000}).status_code == 413
    bridge.wait_status(ok, "success")
    bridge.wait_status(failed, "failure")

    samples = scrape(bridge)
    received = "vela_bridge_deliveries_received_total"
    assert value(samples, received, event="push", outcome="queued") == 2
    assert value(samples, received, event="push", outcome="duplicate") == 1
    assert value(samples, received, event="issue_comment", outcome="skipped") == 1
    assert value(samples, received, event="ping", outcome="pong") == 1
    assert value(samples, received, event="", outcome="unauthorized") == 1
    assert value(samples, received, event="push", outcome="bad_request") == 1
    assert value(samples, received, event="", outcome="too_large") == 1
    attempts = "vela_bridge_forward_attempts_total"
    assert value(samples, attempts, endpoint="builds", result="2xx") == 1
    assert value(samples, attempts, endpoint="builds", result="4xx") == 1
    finished = "vela_bridge_deliveries_finished_total"
    assert value(samples, finished, state="success") == 1
    assert value(samples, finished, state="failure") == 1
    assert value(samples, finished, state="skipped") == 1
    assert value(samples, "vela_bridge_intake_duration_seconds_count") == 8
    assert value(samples, "vela_bridge_forward_duration_seconds_count") == 2
    assert value(samples, "vela_bridge_queue_depth") == 0
    assert value(samples, "vela_bridge_forwarding_paused") == 0


def test_queue_gauges_and_paused_gauge(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(vela={"auth_retry_seconds": 60})
    vela.always(Reply(401, {"error": "token expired"}))
    bridge.send("push", push("refs/heads/a"))
    bridge.send("push", push("refs/heads/b"))
    vela.wait_for_posts(1)
    time.sleep(0.3)
    samples = scrape(bridge)
    assert value(samples, "vela_bridge_queue_depth") == 2
    assert value(samples, "vela_bridge_queue_oldest_pending_age_seconds") > 0
    assert value(samples, "vela_bridge_forwarding_paused") == 1
    assert value(samples, "vela_bridge_forward_attempts_total", endpoint="builds", result="4xx")


def test_healthz_and_readyz(bridge: Bridge) -> None:
    assert bridge.client.get("/healthz").json() == {"status": "ok"}
    assert bridge.client.get("/readyz").json() == {"status": "ready"}


def _files_cannot_grow(bridge: Bridge) -> Callable[[], None]:
    """As on a full disk: the bridge may not grow a file (RLIMIT_FSIZE, set from outside),
    so SQLite's next commit cannot append to its write-ahead log. Returns the undo."""
    assert bridge.process is not None
    pid, unlimited = bridge.process.pid, resource.RLIM_INFINITY
    wal = bridge.db.with_name(bridge.db.name + "-wal")
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (wal.stat().st_size, unlimited))
    return lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))


def _deliveries_refused(bridge: Bridge) -> Callable[[], None]:
    """Every INSERT of a delivery fails: a trigger added through a connection of its own."""

    def sql(statement: str) -> None:
        with contextlib.closing(sqlite3.connect(bridge.db, timeout=5)) as conn:
            conn.execute(statement)

    sql(
        "CREATE TRIGGER full BEFORE INSERT ON deliveries"
        " BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"
    )
    return lambda: sql("DROP TRIGGER full")


@pytest.mark.parametrize("cause", [_files_cannot_grow, _deliveries_refused])
def test_readyz_fails_while_intake_cannot_store_and_recovers_with_it(
    make_bridge: Any, cause: Callable[[Bridge], Callable[[], None]]
) -> None:
    """/readyz answers 503 exactly when intake would (interface.md: "the queue cannot store
    it" is a 503), not only when SELECT 1 fails; both recover without a restart, as no
    sync failed (nothing acknowledged is in doubt)."""
    bridge = make_bridge()
    guid = str(uuid.uuid4())
    assert bridge.send("push", push(), guid=guid).status_code == 202
    bridge.wait_status(guid, "success")  # the queue is quiet: nothing else writes
    undo = cause(bridge)
    try:
        ready = bridge.client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["reason"].startswith("queue: ")
        assert bridge.send("push", push()).status_code == 503
        assert bridge.client.get("/readyz").status_code == 503
    finally:
        undo()
    assert bridge.client.get("/readyz").json() == {"status": "ready"}
    assert bridge.send("push", push()).status_code == 202


def test_no_secret_ever_reaches_the_logs_or_answers(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(vela={"auth_retry_seconds": 0.2})
    signatures = []
    answers = []
    for secret in (SECRET, OTHER_SECRET, "wrong"):
        body = push()
        signatures.append(sign(json.dumps(body).encode(), secret.encode()).removeprefix("sha256="))
        answers.append(bridge.send("push", body, secret=secret).text)
    vela.script(Reply(401, {"error": "bad token"}), Reply(500, {"error": "boom"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "success")
    answers.append(bridge.api("GET", "/api/deliveries").text)
    answers.append(bridge.api("GET", "/api/repos/octo-org/web.app/logs/1/1").text)
    answers.append(bridge.client.get("/metrics").text)
    bridge.stop()
    logs = bridge.logs()
    assert '"message":"delivery queued"' in logs  # the logs did capture the run
    assert '"http_status":401' in logs and "forwarding paused" in logs
    for secret in (SECRET, OTHER_SECRET, VELA_TOKEN, OPERATOR_TOKEN, *signatures):
        assert secret not in logs
        for answer in answers:
            assert secret not in answer


def test_every_answer_to_a_webhook_leaves_one_log_line(make_bridge: Any, vela: FakeVela) -> None:
    """Refusals too (413, 401, 400, 415, 503) and ping: one line each from intake, with
    the GUID and event GitHub's headers name, the status, the HTTP status and the reason;
    never the signature."""
    bridge = make_bridge(server={"max_body_bytes": 20_000})
    vela.go_down()  # nothing forwarded: the GUIDs stay in intake's lines
    g = {name: str(uuid.uuid4()) for name in ("big", "bad", "none", "noevent", "ping", "xml")}
    g |= {name: str(uuid.uuid4()) for name in ("queued", "full", "skipped")}
    assert (
        bridge.send("push", {**push(), "padding": "x" * 30_000}, guid=g["big"]).status_code == 413
    )
    wrong = bridge.send("push", push(), guid=g["bad"], secret="wrong")
    github = {"X-GitHub-Event": "push", "X-GitHub-Delivery": g["none"]}
    unsigned = bridge.client.post("/webhook", json=push(), headers=github)
    assert wrong.status_code == unsigned.status_code == 401
    no_event = bridge.send("push", push(), guid=g["noevent"], headers={"X-GitHub-Event": ""})
    no_guid = bridge.send("push", push(), headers={"X-GitHub-Delivery": ""})
    assert no_event.status_code == no_guid.status_code == 400
    assert bridge.send("ping", payload("ping.1.json"), guid=g["ping"]).status_code == 200
    xml = bridge.send("push", push(), guid=g["xml"], headers={"Content-Type": "text/xml"})
    assert xml.status_code == 415
    assert bridge.send("push", push(), guid=g["queued"]).status_code == 202
    assert bridge.send("push", push(), guid=g["queued"]).status_code == 200  # duplicate
    undo = _deliveries_refused(bridge)
    assert bridge.send("push", push(), guid=g["full"]).status_code == 503
    undo()
    skipped = payload("issue_comment.created.1.json")
    assert bridge.send("issue_comment", skipped, guid=g["skipped"]).status_code == 200
    bridge.stop()

    logs = bridge.logs()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    intake = [line for line in lines if line["logger"] == "bridge.intake"]
    assert len(intake) == 11, intake  # one per answer above

    def line(guid: str, status: str) -> dict[str, Any]:
        found = [x for x in intake if x["delivery"] == guid and x["status"] == status]
        assert len(found) == 1, (guid, status, intake)
        return found[0]

    def check(name: str, status: str, code: int, event: str, reason: str) -> dict[str, Any]:
        found = line(g[name], status)
        assert found["http_status"] == code and found["event"] == event, found
        assert reason in found["reason"], found
        assert found["message"] == f"delivery {status}" and found["duration_ms"] >= 0
        return found

    check("big", "too_large", 413, "push", "server.max_body_bytes")
    check("bad", "unauthorized", 401, "push", "does not match any configured secret")
    check("none", "unauthorized", 401, "push", "X-Hub-Signature-256 missing")
    check("noevent", "bad_request", 400, "", "X-GitHub-Event header missing")
    anonymous = line("", "bad_request")
    assert anonymous["http_status"] == 400 and "X-GitHub-Delivery" in anonymous["reason"]
    check("ping", "pong", 200, "ping", "")
    check("xml", "bad_request", 415, "push", "unsupported content type")
    queued = check("queued", "queued", 202, "push", "")
    assert queued["repo"] == "octo-org/web.app" and queued["level"] == "info"
    check("queued", "duplicate", 200, "push", "")
    full = check("full", "unavailable", 503, "push", "cannot store the delivery")
    assert full["level"] == "error" and "disk is full" in full["reason"]
    assert full["repo"] == "octo-org/web.app"
    check("skipped", "skipped", 200, "issue_comment", "not forwarded")
    assert re.search(r"[0-9a-f]{64}", logs) is None  # no signature, whatever its prefix


def test_dockerfile_runs_the_packaged_command() -> None:
    """No hadolint here: check the image's entry point is the console script we ship."""
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])$", dockerfile, re.MULTILINE)
    assert entrypoint is not None
    command = json.loads(entrypoint.group(1))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert command[0] == "vela-bridge"
    assert f'{command[0]} = "bridge.cli:main"' in pyproject
    assert re.search(r"^USER\s+(?!root\b)\S+", dockerfile, re.MULTILINE), "runs as non-root"
    assert re.search(r"^HEALTHCHECK\b.*healthz", dockerfile, re.MULTILINE)
    assert re.search(r"^VOLUME\b", dockerfile, re.MULTILINE)
    from bridge.cli import main

    assert callable(main)
