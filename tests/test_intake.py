"""POST /webhook through a real uvicorn server: every row of interface.md's status table."""

from __future__ import annotations

import http.client
import json
import resource
import signal
import uuid
from typing import Any

import pytest

from bridge.signature import sign
from tests.fakes.vela import FakeVela
from tests.support import OTHER_SECRET, SECRET, Bridge, payload

PUSH = payload("hand.push.feature-branch.json")
PATH = f"/api/v1/repos/{PUSH['repository']['owner']['login']}/{PUSH['repository']['name']}/builds"


def raw_post(bridge: Bridge, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
    """POST with exactly these header bytes (httpx refuses to send some of them)."""
    conn = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=10)
    try:
        conn.putrequest("POST", "/webhook", skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader(b"Content-Length", str(len(body)).encode())
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return response.status, data
    finally:
        conn.close()


def signed_headers(body: bytes, **extra: bytes) -> list[tuple[bytes, bytes]]:
    headers = {
        b"X-GitHub-Event": b"push",
        b"X-GitHub-Delivery": str(uuid.uuid4()).encode(),
        b"X-Hub-Signature-256": sign(body, SECRET.encode()).encode(),
        b"Content-Type": b"application/json",
    }
    for key, value in extra.items():
        headers[key.replace("_", "-").encode()] = value
    return list(headers.items())


@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_accepted_delivery_is_queued_and_forwarded(
    shared_bridge: Bridge, vela: FakeVela, form: bool
) -> None:
    guid = str(uuid.uuid4())
    response = shared_bridge.send("push", PUSH, guid=guid, form=form)
    assert response.status_code == 202
    assert response.json() == {"status": "queued", "delivery": guid}
    post = vela.wait_for_posts(1)[0]
    assert post.path == PATH
    assert post.body["commit"] == PUSH["head_commit"]["id"]
    assert post.headers["X-GitHub-Delivery"] == guid
    assert post.headers["Authorization"] == "Bearer vela-token"
    assert post.headers["User-Agent"].startswith("vela-bridge/")


def test_rotated_secret_is_accepted(shared_bridge: Bridge, vela: FakeVela) -> None:
    response = shared_bridge.send("push", PUSH, secret=OTHER_SECRET)
    assert response.status_code == 202


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "sha256=",
        "sha256=" + "0" * 64,
        "sha256=" + "g" * 64,
        "sha1=" + "0" * 40,
        "SHA256=abc",
    ],
)
def test_bad_signature_is_401(shared_bridge: Bridge, signature: str | None) -> None:
    body = json.dumps(PUSH).encode()
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "Content-Type": "application/json",
    }
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    response = shared_bridge.client.post("/webhook", content=body, headers=headers)
    assert response.status_code == 401
    assert "X-Hub-Signature-256" in response.json()["error"]


def test_wrong_secret_and_sha1_only_are_401(shared_bridge: Bridge) -> None:
    assert shared_bridge.send("push", PUSH, secret="not configured").status_code == 401
    body = json.dumps(PUSH).encode()
    import hashlib
    import hmac

    sha1 = "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    response = shared_bridge.client.post(
        "/webhook",
        content=body,
        headers={
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature": sha1,
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 401


def test_signature_of_another_body_is_401(shared_bridge: Bridge) -> None:
    body = json.dumps(PUSH).encode()
    headers = dict(signed_headers(body))
    status, _ = raw_post(shared_bridge, body + b" ", list(headers.items()))
    assert status == 401


def test_non_ascii_signature_is_401(shared_bridge: Bridge) -> None:
    body = json.dumps(PUSH).encode()
    headers = dict(signed_headers(body))
    headers[b"X-Hub-Signature-256"] = "sha256=é".encode() + b"0" * 62
    status, data = raw_post(shared_bridge, body, list(headers.items()))
    assert status == 401
    assert json.loads(data)["error"]


@pytest.mark.parametrize("missing", ["X-GitHub-Event", "X-GitHub-Delivery"])
def test_missing_github_header_is_400(shared_bridge: Bridge, missing: str) -> None:
    body = json.dumps(PUSH).encode()
    headers = {k.decode(): v.decode() for k, v in signed_headers(body)}
    del headers[missing]
    response = shared_bridge.client.post("/webhook", content=body, headers=headers)
    assert response.status_code == 400
    assert missing in response.json()["error"]


def test_non_ascii_delivery_header_is_400(shared_bridge: Bridge) -> None:
    body = json.dumps(PUSH).encode()
    headers = dict(signed_headers(body))
    headers[b"X-GitHub-Delivery"] = "délivery".encode()
    status, _ = raw_post(shared_bridge, body, list(headers.items()))
    assert status == 400


@pytest.mark.parametrize(
    "content_type", ["text/plain", "", "application/xml", "multipart/form-data"]
)
def test_other_content_type_is_415(shared_bridge: Bridge, content_type: str) -> None:
    body = json.dumps(PUSH).encode()
    headers = dict(signed_headers(body))
    headers[b"Content-Type"] = content_type.encode()
    status, data = raw_post(shared_bridge, body, list(headers.items()))
    assert status == 415
    assert "content type" in json.loads(data)["error"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"a string"', "application/json"),
        (b"", "application/json"),
        (b'{"ref": "\xff\xfe"}', "application/json"),
        (b"{}", "application/json; charset=latin-1"),
        (b"{}", "application/json; charset=bogus-\xe9"),
        (b"payload=%7B", "application/x-www-form-urlencoded"),
        (b"payload=%FF%FE", "application/x-www-form-urlencoded"),
        (b"other=1", "application/x-www-form-urlencoded"),
        (b"payload=1&payload=2", "application/x-www-form-urlencoded"),
        (b"payload=\xe9", "application/x-www-form-urlencoded"),
    ],
)
def test_unparseable_body_is_400(shared_bridge: Bridge, body: bytes, content_type: str) -> None:
    headers = dict(signed_headers(body))
    headers[b"Content-Type"] = content_type.encode("latin-1")
    status, data = raw_post(shared_bridge, body, list(headers.items()))
    assert status == 400
    assert json.loads(data)["error"]


@pytest.mark.parametrize(
    ("event", "path"),
    [
        ("push", ["repository", "name"]),
        ("push", ["repository", "owner", "login"]),
        ("push", ["ref"]),
        ("pull_request", ["number"]),
        ("pull_request", ["pull_request", "head", "sha"]),
        ("pull_request", ["pull_request", "base", "ref"]),
        ("deployment", ["deployment", "id"]),
        ("deployment", ["deployment", "environment"]),
    ],
)
def test_missing_required_key_is_400(shared_bridge: Bridge, event: str, path: list[str]) -> None:
    name = {
        "push": "hand.push.feature-branch.json",
        "pull_request": "pull_request.opened.1.json",
        "deployment": "deployment.created.1.json",
    }[event]
    body = payload(name)
    node = body
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    response = shared_bridge.send(event, body)
    assert response.status_code == 400
    assert path[-1] in response.json()["error"]


def test_ping_is_pong_and_not_stored(shared_bridge: Bridge) -> None:
    guid = str(uuid.uuid4())
    response = shared_bridge.send("ping", payload("ping.1.json"), guid=guid)
    assert response.status_code == 200
    assert response.json() == {"status": "pong"}
    assert shared_bridge.delivery(guid) is None


def test_duplicate_guid_is_200_and_forwarded_once(shared_bridge: Bridge, vela: FakeVela) -> None:
    guid = str(uuid.uuid4())
    assert shared_bridge.send("push", PUSH, guid=guid).status_code == 202
    second = shared_bridge.send("push", PUSH, guid=guid, form=True)
    assert second.status_code == 200
    assert second.json() == {"status": "duplicate", "delivery": guid}
    shared_bridge.wait_status(guid, "success")
    assert [p.headers["X-GitHub-Delivery"] for p in vela.posts()].count(guid) == 1


@pytest.mark.parametrize(
    ("event", "name", "reason"),
    [
        ("issue_comment", "issue_comment.created.1.json", "issue_comment"),
        ("pull_request", "pull_request.closed.1.json", "closed"),
        ("installation", "installation.created.1.json", "installation"),
    ],
)
def test_not_forwarded_events_are_skipped_and_stored(
    shared_bridge: Bridge, vela: FakeVela, event: str, name: str, reason: str
) -> None:
    guid = str(uuid.uuid4())
    response = shared_bridge.send(event, payload(name), guid=guid)
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "skipped" and answer["delivery"] == guid
    assert reason in answer["reason"]
    stored = shared_bridge.delivery(guid)
    assert stored is not None and stored["status"] == "skipped" and stored["jobs"] == []
    assert all(p.headers["X-GitHub-Delivery"] != guid for p in vela.posts())


def test_skip_ci_marker_is_skipped(shared_bridge: Bridge, vela: FakeVela) -> None:
    body = json.loads(json.dumps(PUSH))
    body["head_commit"]["message"] = "docs only [SKIP CI]"
    guid = str(uuid.uuid4())
    response = shared_bridge.send("push", body, guid=guid)
    assert response.status_code == 200
    assert response.json()["status"] == "skipped"
    assert "[skip ci]" in response.json()["reason"].lower()
    assert all(p.headers["X-GitHub-Delivery"] != guid for p in vela.posts())


def test_content_length_over_the_cap_is_413(make_bridge: Any) -> None:
    bridge = make_bridge(server={"max_body_bytes": 4096})
    body = json.dumps({**PUSH, "padding": "x" * 5000}).encode()
    response = bridge.send("push", body)
    assert response.status_code == 413
    # A body under the cap still goes through on the same server.
    assert bridge.send("push", PUSH).status_code == 202


def test_chunked_body_over_the_cap_is_413_without_reading_it_all(make_bridge: Any) -> None:
    bridge = make_bridge(server={"max_body_bytes": 4096})

    def chunks() -> Any:
        yield b"{" + b" " * 4000
        yield b" " * 4000  # the cap is crossed here
        yield b"}"

    headers = {k.decode(): v.decode() for k, v in signed_headers(b"{}")}
    response = bridge.client.post("/webhook", content=chunks(), headers=headers)
    assert response.status_code == 413


def test_get_is_405(shared_bridge: Bridge) -> None:
    assert shared_bridge.client.get("/webhook").status_code == 405


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_queue_that_cannot_store_answers_503_and_nothing_is_lost(
    make_bridge: Any, vela: FakeVela
) -> None:
    """A file-size limit stands in for a full disk: no 2xx for what was not stored."""
    vela.go_down()  # keep everything in the queue
    bridge = make_bridge(start=False).start(preexec_fn=_limit_file_size)
    answers: dict[str, int] = {}
    for _ in range(200):
        guid = str(uuid.uuid4())
        answers[guid] = bridge.send("push", PUSH, guid=guid).status_code
        if answers[guid] == 503:
            break
    assert 503 in answers.values(), "the size limit was never reached"
    assert set(answers.values()) <= {202, 503}
    assert bridge.client.get("/healthz").status_code == 200
    bridge.kill()
    # Every 202 was stored: a bridge without the limit forwards each of them.
    vela.come_up()
    restarted = make_bridge()
    accepted = [g for g, status in answers.items() if status == 202]
    for guid in accepted:
        restarted.wait_status(guid, "success")
    assert len(vela.posts()) == len(accepted)
