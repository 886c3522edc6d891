"""bridge.convert.fields: the skeleton decode gives every converter what the full decode does.

Two checks. Every recorded payload is converted while a recording wrapper notes each
key the converters read; each of those keys must be declared in the event's skeleton.
Then, on recorded payloads and on damaged ones (tests/test_convert_fuzz.py's
strategy), converting what ``read_payload`` returns must give the same conversion,
or the same refusal, as converting the full payload.
"""

from __future__ import annotations

import contextlib
import json
import types
import typing
from collections.abc import Iterator, Mapping
from itertools import product
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from bridge.convert import Policy, convert
from bridge.convert.fields import read_payload, skeleton
from bridge.errors import PayloadError
from tests.test_convert_fuzz import FILES, PAYLOADS, POLICIES, _event_of, damaged

ALL_POLICIES = [
    Policy(deployment, forks)
    for deployment, forks in product(["build", "deployment"], ["trusted", "never", "always"])
]


def _declared(annotation: Any) -> dict[str, Any] | None:
    """The keys of a TypedDict annotation (through ``X | None``), or None for Any."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if annotation is Any:
        return None
    return typing.get_type_hints(annotation)


class _Recording(Mapping[str, Any]):
    """A payload object that notes every key read whose skeleton does not declare it."""

    def __init__(self, data: dict[str, Any], keys: dict[str, Any], path: str, missing: set[str]):
        self._data, self._keys, self._path, self._missing = data, keys, path, missing

    def __getitem__(self, key: str) -> Any:
        path = f"{self._path}.{key}".lstrip(".")
        if key not in self._keys:  # noted before the look-up: absent keys count too
            self._missing.add(path)
            return self._data[key]
        value = self._data[key]
        below = _declared(self._keys[key])
        if below is not None and isinstance(value, dict):
            return _Recording(value, below, path, self._missing)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _read_file(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


@pytest.mark.parametrize("name", FILES)
def test_every_key_a_converter_reads_is_in_the_skeleton(name: str) -> None:
    event = _event_of(name)
    payload = json.loads(_read_file(name))
    keys = typing.get_type_hints(skeleton(event))
    missing: set[str] = set()
    for policy, force in product(ALL_POLICIES, [False, True]):
        with contextlib.suppress(PayloadError):
            convert(event, _Recording(payload, keys, "", missing), policy, force=force)
    assert not missing, f"{name}: read but not declared in the {event} skeleton: {missing}"


@pytest.mark.parametrize("name", FILES)
def test_recorded_payload_converts_the_same_from_the_skeleton(name: str) -> None:
    event = _event_of(name)
    body = _read_file(name)
    full = json.loads(body)
    read = read_payload(event, body)
    assert len(read) <= len(full)
    for policy, force in product(ALL_POLICIES, [False, True]):
        assert _outcome(event, read, policy, force) == _outcome(event, full, policy, force)


def _outcome(event: str, payload: Any, policy: Policy, force: bool) -> Any:
    try:
        return convert(event, payload, policy, force=force)
    except PayloadError as exc:
        return ("refused", exc.message)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged(), policy=POLICIES)
def test_damaged_payload_converts_the_same_from_the_skeleton(
    case: tuple[str, Any], policy: Policy
) -> None:
    event, payload = case
    body = json.dumps(payload).encode()
    if not isinstance(payload, dict):
        with pytest.raises(PayloadError, match="body must be a JSON object"):
            read_payload(event, body)
        return
    assert _outcome(event, read_payload(event, body), policy, False) == _outcome(
        event, payload, policy, False
    )


def test_push_skeleton_leaves_out_commits_and_most_of_the_repository() -> None:
    body = _read_file("push.1.json")
    read = read_payload("push", body)
    assert "commits" not in read
    assert set(read["repository"]) <= {
        "name", "full_name", "owner", "html_url", "clone_url", "default_branch", "fork",
    }  # fmt: skip
    assert read["head_commit"]["id"] == json.loads(body)["head_commit"]["id"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"ref": "a",}',
        b'{"ref": "a"} trailing',
        b'{"commits": "\xff\xfe", "ref": "a"}',  # bad UTF-8 in a field nobody reads
        b'{"commits": "\\ud800", "ref": "a"}',  # a lone surrogate there
        b'{"commits": [1, 01], "ref": "a"}',  # a number JSON does not allow, there too
        b'{"commits": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_body_that_is_not_json_is_refused_even_where_nothing_is_read(body: bytes) -> None:
    with pytest.raises(PayloadError, match="not valid UTF-8 JSON"):
        read_payload("push", body)


@pytest.mark.parametrize("body", [b"[]", b'"push"', b"null", b"3"])
def test_body_that_is_not_an_object_is_refused(body: bytes) -> None:
    with pytest.raises(PayloadError, match="must be a JSON object"):
        read_payload("push", body)


def test_shape_the_skeleton_does_not_describe_is_read_in_full() -> None:
    payload = json.loads(_read_file("push.1.json"))
    payload["repository"] = "octo-org/web.app"  # not an object: the converter says so
    read = read_payload("push", json.dumps(payload).encode())
    assert read == payload
    with pytest.raises(PayloadError, match=r"repository\.name"):
        convert("push", read, Policy())
