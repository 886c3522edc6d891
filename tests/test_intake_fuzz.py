"""Property tests through a real server: no input to POST /webhook ever yields a 5xx."""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.signature import sign
from tests.support import SECRET, Bridge, payload
from tests.test_convert_fuzz import JSON_VALUES
from tests.test_intake import raw_post

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ANSWERS = {200, 202, 400, 401, 413, 415}
# Header values http.client can put on the wire: no CR, LF or NUL.
HEADER_BYTES = st.binary(max_size=80).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)
CONTENT_TYPES = st.sampled_from(
    [
        b"application/json",
        b"application/x-www-form-urlencoded",
        b"application/json; charset=utf-8",
        b"Application/JSON ; charset=UTF-8",
        b"application/json; charset=\xff",
        b"text/plain",
        b"",
    ]
)
EVENTS = st.sampled_from(
    [b"push", b"pull_request", b"deployment", b"ping", b"issue_comment", b"", b"PUSH", b"p\xe9"]
)
TEMPLATES = [
    ("push", payload("hand.push.feature-branch.json")),
    ("pull_request", payload("pull_request.opened.1.json")),
    ("deployment", payload("deployment.created.1.json")),
]


def assert_clean(status: int, data: bytes) -> None:
    assert status in ANSWERS, (status, data[:300])
    if status == 400 and data == b"Invalid HTTP request received.":
        return  # uvicorn's own answer to bytes that are not HTTP (a control byte in a header)
    answer = json.loads(data)
    assert isinstance(answer, dict) and ("error" in answer or "status" in answer)
    assert b"Traceback" not in data


@SETTINGS
@given(
    body=st.binary(max_size=2000),
    event=EVENTS,
    guid=HEADER_BYTES,
    content_type=CONTENT_TYPES,
    signature=HEADER_BYTES,
    sign_it=st.booleans(),
)
def test_arbitrary_requests_get_a_clean_answer(
    shared_bridge: Bridge,
    body: bytes,
    event: bytes,
    guid: bytes,
    content_type: bytes,
    signature: bytes,
    sign_it: bool,
) -> None:
    if sign_it:
        signature = sign(body, SECRET.encode()).encode()
    headers = [
        (b"X-GitHub-Event", event),
        (b"X-GitHub-Delivery", guid),
        (b"X-Hub-Signature-256", signature),
        (b"Content-Type", content_type),
    ]
    assert_clean(*raw_post(shared_bridge, body, headers))


def _damage(value: Any, path: list[int], new: Any) -> Any:
    """Replace the subtree reached by following ``path`` (indexes into keys) with ``new``."""
    if not path or not isinstance(value, dict | list) or not value:
        return new
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = keys[path[0] % len(keys)]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[key] = _damage(value[key], path[1:], new)  # type: ignore[index]
    return copy


@SETTINGS
@given(
    template=st.sampled_from(TEMPLATES),
    path=st.lists(st.integers(min_value=0, max_value=200), max_size=5),
    new=JSON_VALUES,
    form=st.booleans(),
)
def test_signed_damaged_payloads_get_a_clean_answer(
    shared_bridge: Bridge, template: tuple[str, Any], path: list[int], new: Any, form: bool
) -> None:
    event, body = template
    damaged = _damage(body, path, new)
    raw = json.dumps(damaged).encode()
    response = shared_bridge.send(event, raw, guid=str(uuid.uuid4()), form=form)
    assert_clean(response.status_code, response.content)
    if not isinstance(damaged, dict):
        assert response.status_code == 400
