"""The operator API and CLI through a real server (operator-api.md)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest

from tests.fakes.vela import FakeVela, Reply
from tests.support import OPERATOR_TOKEN, Bridge, payload
from tests.test_forward import push

REPO = "octo-org/web.app"
BUILDS = f"/api/repos/{REPO}/builds"
# The example build object of operator-api.md: every one of these is always present.
BUILD_FIELDS = {
    "id", "number", "repo", "delivery", "github_event", "event", "status", "error",
    "created_at", "enqueued_at", "started_at", "finished_at", "commit", "branch", "ref",
    "remote", "message", "timestamp", "author", "author_avatar", "author_email", "link_url",
    "vela_build", "jobs",
}  # fmt: skip
JOB_FIELDS = {"id", "number", "status", "enqueued_at", "started_at", "finished_at",
              "exit_code", "environment"}  # fmt: skip


def number_of(bridge: Bridge, guid: str) -> int:
    (found,) = bridge.api("GET", "/api/deliveries", params={"guid": guid}).json()
    return int(found["number"])


def wait_build(bridge: Bridge, number: int, status: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    build: dict[str, Any] = {}
    while time.monotonic() < deadline:
        build = bridge.api("GET", f"{BUILDS}/{number}").json()
        if build.get("status") == status:
            return build
        time.sleep(0.05)
    raise AssertionError(f"build {number} is {build.get('status')}, expected {status}")


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Basic {OPERATOR_TOKEN}", f"Bearer {OPERATOR_TOKEN}x"],
)
def test_every_route_wants_the_operator_token(bridge: Bridge, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in [
        ("GET", BUILDS), ("GET", f"{BUILDS}/1"), ("POST", f"{BUILDS}/1"),
        ("GET", f"/api/repos/{REPO}/logs/1/1"), ("DELETE", f"/api/repos/{REPO}/logs/1/1"),
        ("GET", "/api/deliveries"),
    ]:  # fmt: skip
        response = bridge.client.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert "token" in response.json()["error"]


def test_without_a_configured_token_the_api_is_closed(make_bridge: Any) -> None:
    bridge = make_bridge(start=False)
    text = bridge.config.read_text()
    bridge.config.write_text(text.replace(f'token = "{OPERATOR_TOKEN}"\n', ""))
    bridge.start()
    for authorization in ("", "Bearer", f"Bearer {OPERATOR_TOKEN}"):
        response = bridge.client.get("/api/deliveries", headers={"Authorization": authorization})
        assert response.status_code == 401


def test_builds_are_listed_newest_first_with_every_field(bridge: Bridge, vela: FakeVela) -> None:
    guids = [str(uuid.uuid4()) for _ in range(3)]
    for guid in guids:
        bridge.send("push", push(), guid=guid)
    bridge.send("push", push(repo="other"))
    for guid in guids:
        bridge.wait_status(guid, "success")
    builds = bridge.api("GET", BUILDS).json()
    assert [b["delivery"] for b in builds] == guids[::-1]
    assert [b["number"] for b in builds] == [3, 2, 1]
    for build in builds:
        assert set(build) == BUILD_FIELDS
        assert set(build["jobs"][0]) == JOB_FIELDS
    # Owner and name match case-insensitively.
    assert (
        len(
            bridge.api(
                "GET",
                BUILDS.upper().replace("/API/REPOS", "/api/repos").replace("/BUILDS", "/builds"),
            ).json()
        )
        == 3
    )


def test_a_build_shows_what_was_sent_and_what_vela_answered(bridge: Bridge, vela: FakeVela) -> None:
    body = push("refs/heads/feature/login")
    guid = str(uuid.uuid4())
    bridge.send("push", body, guid=guid)
    bridge.wait_status(guid, "success")
    build = bridge.api("GET", f"{BUILDS}/1").json()
    assert build["repo"] == REPO and build["delivery"] == guid
    assert build["github_event"] == "push" and build["event"] == "push"
    assert build["commit"] == body["head_commit"]["id"]
    assert build["branch"] == "feature/login" and build["ref"] == "refs/heads/feature/login"
    assert build["remote"] == body["repository"]["clone_url"]
    assert build["link_url"] == body["head_commit"]["url"]
    assert build["author_avatar"] == body["sender"]["avatar_url"]
    assert build["timestamp"] > 0
    assert build["created_at"] <= build["started_at"] <= build["finished_at"]
    assert build["vela_build"] == {"number": 1, "link": f"{vela.url}/{REPO}/1"}
    (job,) = build["jobs"]
    assert job["status"] == "success" and job["exit_code"] == 201 and job["number"] == 1
    assert job["environment"] == {
        "VELA_URL": vela.url,
        "VELA_ENDPOINT": f"/api/v1/repos/{REPO}/builds",
    }


def test_paging_and_status_filter(bridge: Bridge, vela: FakeVela) -> None:
    vela.script(Reply(422, {"error": "no"}))
    guids = [str(uuid.uuid4()) for _ in range(5)]
    for index, guid in enumerate(guids):
        bridge.send("push", push(f"refs/heads/b{index}"), guid=guid)
    bridge.wait_status(guids[0], "failure")
    for guid in guids[1:]:
        bridge.wait_status(guid, "success")
    page2 = bridge.api("GET", BUILDS, params={"per_page": 2, "page": 2}).json()
    assert [b["number"] for b in page2] == [3, 2]
    assert bridge.api("GET", BUILDS, params={"per_page": 2, "page": 4}).json() == []
    failed = bridge.api("GET", BUILDS, params={"status": "failure"}).json()
    assert [b["delivery"] for b in failed] == [guids[0]]
    assert "no" in failed[0]["error"]


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        (BUILDS, {"page": "0"}, 400),
        (BUILDS, {"page": "x"}, 400),
        (BUILDS, {"per_page": "101"}, 400),
        (BUILDS, {"status": "done"}, 400),
        ("/api/repos/nobody/nothing/builds", {}, 404),
        (f"{BUILDS}/99", {}, 404),
        (f"{BUILDS}/0", {}, 400),
        (f"{BUILDS}/one", {}, 400),
        (f"/api/repos/{REPO}/logs/1/2", {}, 404),
        (f"/api/repos/{REPO}/logs/1/x", {}, 400),
        ("/api/deliveries", {"per_page": "-1"}, 400),
        (f"{BUILDS}/99999999999999999999", {}, 404),
        (f"/api/repos/{REPO}/logs/99999999999999999999/1", {}, 404),
        (BUILDS, {"page": "99999999999999999999"}, 400),
        (f"{BUILDS}/{'9' * 4000}", {}, 400),
    ],
)
def test_bad_requests(bridge: Bridge, path: str, params: dict[str, str], status: int) -> None:
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "success")
    response = bridge.api("GET", path, params=params)
    assert response.status_code == status
    assert response.json()["error"]


def test_deliveries_lists_every_repository_and_none(bridge: Bridge, vela: FakeVela) -> None:
    install = str(uuid.uuid4())
    bridge.send("installation", payload("installation.created.1.json"), guid=install)
    pushed = str(uuid.uuid4())
    bridge.send("push", push(), guid=pushed)
    bridge.wait_status(pushed, "success")
    everything = bridge.api("GET", "/api/deliveries").json()
    assert [d["delivery"] for d in everything] == [pushed, install]
    (found,) = bridge.api("GET", "/api/deliveries", params={"guid": install}).json()
    assert found["repo"] == "" and found["number"] == 0 and found["status"] == "skipped"
    assert "installation" in found["error"] and found["jobs"] == []
    by_event = bridge.api("GET", "/api/deliveries", params={"event": "push"}).json()
    assert [d["delivery"] for d in by_event] == [pushed]


def test_restart_of_a_failed_delivery_reaches_vela(bridge: Bridge, vela: FakeVela) -> None:
    vela.script(Reply(422, {"error": "pipeline broken"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "failure")
    restarted = bridge.api("POST", f"{BUILDS}/1")
    assert restarted.status_code == 200
    assert restarted.json()["status"] == "pending" and restarted.json()["error"] == ""
    build = wait_build(bridge, 1, "success")
    assert len(vela.posts()) == 2
    assert build["vela_build"]["number"] == 1


def test_restart_of_a_success_sends_it_again_on_purpose(bridge: Bridge, vela: FakeVela) -> None:
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "success")
    assert bridge.api("POST", f"{BUILDS}/1").status_code == 200
    build = wait_build(bridge, 1, "success")
    assert len(vela.posts()) == 2
    assert build["vela_build"]["number"] == 2


def test_restart_forwards_a_held_fork_pull_request(bridge: Bridge, vela: FakeVela) -> None:
    guid = str(uuid.uuid4())
    held = bridge.send("pull_request", payload("hand.pull_request.fork.json"), guid=guid)
    assert held.json()["status"] == "skipped"
    assert "fork" in held.json()["reason"]
    assert bridge.api("POST", f"{BUILDS}/1").status_code == 200
    build = wait_build(bridge, 1, "success")
    (post,) = vela.posts()
    assert post.body["fork"] is True and post.body["event"] == "pull_request"
    assert build["event"] == "pull_request"


def test_restart_of_an_unsupported_event_is_409(bridge: Bridge, vela: FakeVela) -> None:
    bridge.send("issue_comment", payload("issue_comment.created.1.json"))
    repo = payload("issue_comment.created.1.json")["repository"]["full_name"]
    response = bridge.api("POST", f"/api/repos/{repo}/builds/1")
    assert response.status_code == 409
    assert "issue_comment" in response.json()["error"]
    assert vela.posts() == []


def test_restart_and_cancel_while_in_flight_are_409(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(vela={"timeout_seconds": 3}, queue={"lease_seconds": 10})
    vela.script(Reply(create=True, delay=1.5))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    vela.wait_for_posts(1)
    assert bridge.api("POST", f"{BUILDS}/1").status_code == 409
    cancel = bridge.api("DELETE", f"/api/repos/{REPO}/logs/1/1")
    assert cancel.status_code == 409 and "in flight" in cancel.json()["error"]
    wait_build(bridge, 1, "success")
    finished = bridge.api("DELETE", f"/api/repos/{REPO}/logs/1/1")
    assert finished.status_code == 409 and "finished" in finished.json()["error"]


def test_cancel_of_a_retrying_job_never_reaches_vela_again(bridge: Bridge, vela: FakeVela) -> None:
    vela.always(Reply(500, {"error": "down"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    second = str(uuid.uuid4())
    bridge.send("push", push(), guid=second)  # same lane: waits behind the first
    vela.wait_for_posts(2)
    response = bridge.api("DELETE", f"/api/repos/{REPO}/logs/1/1")
    assert response.status_code == 200
    assert response.json()["status"] == "killed"
    assert response.json()["jobs"][0]["status"] == "killed"
    vela.always(None)
    bridge.wait_status(second, "success")  # the lane moved on
    time.sleep(0.5)
    sent = [p.headers["X-GitHub-Delivery"] for p in vela.posts()]
    assert sent[-1] == second and sent.count(second) == 1
    assert bridge.api("GET", f"{BUILDS}/1").json()["status"] == "killed"


def test_log_has_one_line_per_attempt_then_what_is_next(bridge: Bridge, vela: FakeVela) -> None:
    vela.script(Reply(500, {"error": "first hiccup"}), Reply(502, {"error": "second hiccup"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "success")
    log = bridge.api("GET", f"/api/repos/{REPO}/logs/1/1")
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain")
    lines = log.text.splitlines()
    assert len(lines) == 4
    assert "attempt 1" in lines[0] and "HTTP 500" in lines[0] and "first hiccup" in lines[0]
    assert "attempt 2" in lines[1] and "HTTP 502" in lines[1]
    assert "attempt 3" in lines[2] and "HTTP 201" in lines[2] and " ms " in lines[2]
    assert lines[3] == "finished: success"


def test_log_of_a_retrying_job_says_when_next(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(retry={"initial_backoff_seconds": 60, "max_backoff_seconds": 60})
    vela.script(Reply(503, {"error": "busy"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    vela.wait_for_posts(1)
    deadline = time.monotonic() + 10
    text = ""
    while "next attempt at" not in text and time.monotonic() < deadline:
        text = bridge.api("GET", f"/api/repos/{REPO}/logs/1/1").text
        time.sleep(0.05)
    assert "HTTP 503" in text and "next attempt at" in text


def cli(*args: str, token: str | None = OPERATOR_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BRIDGE_OPERATOR_TOKEN"}
    if token is not None:
        env["BRIDGE_OPERATOR_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, env=env,
        timeout=30,
    )  # fmt: skip


def test_cli_lists_and_replays(bridge: Bridge, vela: FakeVela) -> None:
    vela.script(Reply(422, {"error": "pipeline broken"}))
    guid = str(uuid.uuid4())
    bridge.send("push", push(), guid=guid)
    bridge.wait_status(guid, "failure")
    listed = cli("deliveries", "--url", bridge.url, "--repo", REPO)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["REPO", "#", "STATUS", "EVENT"]
    assert row.split()[:4] == [REPO, "1", "failure", "push"] and guid in row
    assert "pipeline broken" in row
    as_json = json.loads(cli("deliveries", "--url", bridge.url, "--json").stdout)
    assert [b["delivery"] for b in as_json] == [guid]
    replayed = cli("replay", REPO, "1", "--url", bridge.url)
    assert replayed.returncode == 0 and "restarted" in replayed.stdout
    wait_build(bridge, 1, "success")
    # The config file gives the address and the token when --url is not given.
    from_config = cli("deliveries", "--config", str(bridge.config), token=None)
    assert from_config.returncode == 0 and "success" in from_config.stdout


def test_cli_failures_are_one_clear_line(bridge: Bridge) -> None:
    wrong = cli("deliveries", "--url", bridge.url, token="wrong")
    assert wrong.returncode == 1
    assert "refused the operator token" in wrong.stderr and "Traceback" not in wrong.stderr
    down = cli("deliveries", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach the bridge" in down.stderr
    missing = cli("replay", REPO, "42", "--url", bridge.url)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_cli_does_not_follow_a_redirect() -> None:
    """An ingress answering http with a redirect: urllib would replay as a GET elsewhere
    (restarting nothing, yet saying "restarted") and send the token along."""
    seen: list[tuple[str, str | None]] = []

    class Target(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.command, self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    class Redirect(Target):
        def do_POST(self) -> None:
            self.send_response(301)
            self.send_header(
                "Location", f"http://u:pw@127.0.0.1:{target.server_port}{self.path}?k=v"
            )
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST

    target = http.server.HTTPServer(("127.0.0.1", 0), Target)
    front = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    for server in (target, front):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for args in (["replay", REPO, "1"], ["deliveries"]):
            result = cli(*args, "--url", f"http://127.0.0.1:{front.server_port}")
            assert result.returncode == 1 and "Traceback" not in result.stderr
            assert result.stdout == ""
            line = result.stderr.strip()
            assert "answered 301, a redirect to http://127.0.0.1:" in line, line
            assert "pw" not in line and "k=v" not in line
    finally:
        for server in (target, front):
            server.shutdown()
            server.server_close()
    assert seen == []  # nothing reached the redirect's target, the token least of all
