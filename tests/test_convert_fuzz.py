"""Property test: bridge.convert never fails on a damaged payload except with PayloadError.

Each example takes a payload from tests/payloads, replaces (or removes) one subtree
at a random path with arbitrary JSON, and converts it under a random policy.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.convert import Conversion, Policy, Summary, convert
from bridge.errors import PayloadError

PAYLOADS = Path(__file__).parent / "payloads"
FILES = sorted(path.name for path in PAYLOADS.glob("*.json"))
EVENTS = ["push", "pull_request", "deployment", "issue_comment", "ping"]

# Keys the conversion reads: the walk prefers them, so most damage lands where it matters.
READ_KEYS = frozenset(
    {
        "action", "after", "author", "author_association", "avatar_url", "base", "base_ref",
        "before", "clone_url", "committer", "creator", "default_branch", "deleted",
        "deployment", "description", "email", "environment", "fork", "full_name", "head",
        "head_commit", "html_url", "id", "login", "message", "name", "number", "owner",
        "payload", "pull_request", "pusher", "ref", "repo", "repository", "sender", "sha",
        "state", "task", "timestamp", "title", "url", "user", "username",
    }
)  # fmt: skip

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["", "refs/heads/main", "refs/tags/v1", "[skip ci]", "gh-readonly-queue/x"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


@functools.cache
def _read(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text(encoding="utf-8"))


def _event_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if parts[0] == "hand" else parts[0]


def _rebuilt(node: Any, path: list[Any], value: Any) -> Any:
    """A copy of ``node`` with the subtree at ``path`` replaced (copying only the path)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    copied = dict(node) if isinstance(node, dict) else list(node)
    if not rest and value is _REMOVED:
        del copied[key]
    else:
        copied[key] = _rebuilt(node[key], rest, value)
    return copied


_REMOVED = object()


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, Any]:
    """(event, payload): a stored payload with one subtree replaced or removed."""
    name = draw(st.sampled_from(FILES))
    event = draw(st.sampled_from([_event_of(name)] * 4 + EVENTS))
    original = _read(name)
    if draw(st.integers(0, 49)) == 17:
        return event, draw(JSON_VALUES)  # the whole body
    node, path = original, []
    while True:
        keys: list[Any] = list(node) if isinstance(node, dict) else list(range(len(node)))
        preferred = [key for key in keys if key in READ_KEYS]
        focus: bool = bool(preferred) and draw(st.booleans())
        key = draw(st.sampled_from(preferred if focus else keys))
        path.append(key)
        child = node[key]
        if isinstance(child, dict | list) and child and draw(st.integers(0, 2)) > 0:
            node = child
            continue
        remove = isinstance(node, dict) and draw(st.integers(0, 3)) == 0
        value = _REMOVED if remove else draw(JSON_VALUES)
        return event, _rebuilt(original, path, value)


POLICIES = st.builds(
    Policy,
    deployment=st.sampled_from(["build", "deployment"]),
    fork_pull_requests=st.sampled_from(["trusted", "never", "always"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged(), policy=POLICIES, force=st.booleans())
def test_damaged_payload_converts_or_raises_payload_error(
    case: tuple[str, Any], policy: Policy, force: bool
) -> None:
    event, payload = case
    try:
        conv = convert(event, payload, policy, force=force)
    except PayloadError as exc:
        assert str(exc)
        return
    assert isinstance(conv, Conversion)
    assert isinstance(conv.summary, Summary)
    assert all(
        isinstance(getattr(conv.summary, f), str) for f in Summary.__slots__ if f != "timestamp"
    )
    assert isinstance(conv.summary.timestamp, int)
    assert (conv.skip is None) == bool(conv.requests)
    for request in conv.requests:
        body = dict(request.body)
        assert None not in body.values()
        json.dumps(body, allow_nan=False)
        orjson.dumps(body)  # the forwarder's encoder: ints must fit 64 bits
        assert request.order_key.startswith(f"{request.org}/{request.repo}".lower() + " ")
        if request.endpoint == "builds":
            assert isinstance(body["message"], str)
            assert request.path.endswith("/builds")
        else:
            assert request.path.startswith("/api/v1/deployments/")
