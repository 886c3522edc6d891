"""Helpers shared by the event converters: typed reads of a webhook payload.

Two kinds of read (interface.md, "Webhook intake"):
- ``req_*`` for the keys mapping.md reads unconditionally: missing, null or of the
  wrong type raise ``PayloadError`` naming the dotted key (the intake answers 400);
- ``opt_*`` for everything else: a value of the wrong type counts as missing (None),
  so a malformed optional field never crashes the conversion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.errors import PayloadError

# mapping.md, push: "**bridge**: the head commit's message contains, case-insensitively, …"
SKIP_MARKERS = ("[skip ci]", "[ci skip]", "[skip vela]", "[vela skip]", "***no_ci***")

# mapping.md, push: pushes to merge-queue branches are skipped.
MERGE_QUEUE_PREFIX = "gh-readonly-queue/"


@dataclass(frozen=True, slots=True)
class Draft:
    """One event converted to a Vela build body, before the dispatch wraps it up."""

    body: dict[str, Any]  # the build body, None values already dropped
    lane: str  # the ordering lane (ref, PR ref or "deploy:<env>")
    skip: str | None  # why nothing is forwarded, or None
    timestamp: int = 0  # head commit time, Unix seconds, 0 when unknown


def _is_object(value: Any) -> bool:
    """A JSON object: a dict (what the intake's parser makes) or any other Mapping."""
    # type() first: isinstance against the Mapping ABC is several times slower.
    return type(value) is dict or isinstance(value, Mapping)


def _walk(obj: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if type(obj) is not dict and not isinstance(obj, Mapping):  # _is_object, inlined
            return None
        obj = obj.get(key)
    return obj


def opt_str(obj: Any, *keys: str) -> str | None:
    """The string at ``keys``, or None when absent, null or not a string."""
    value = _walk(obj, keys)
    return value if isinstance(value, str) else None


def opt_int(obj: Any, *keys: str) -> int | None:
    """The integer at ``keys`` (a bool is not one), or None."""
    value = _walk(obj, keys)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def opt_obj(obj: Any, *keys: str) -> Mapping[str, Any] | None:
    """The JSON object at ``keys``, or None."""
    value = _walk(obj, keys)
    return value if _is_object(value) else None


def _required(payload: Mapping[str, Any], dotted: str, kind: str) -> Any:
    obj: Any = payload
    parts = dotted.split(".")
    for depth, key in enumerate(parts):
        if not _is_object(obj):
            parent = ".".join(parts[:depth])
            raise PayloadError(f"{dotted}: missing ({parent} is not an object)")
        obj = obj.get(key)
    if obj is None:
        raise PayloadError(f"{dotted}: missing")
    if not _is_kind(obj, kind):
        raise PayloadError(f"{dotted}: expected {kind}, got {json_type(obj)}")
    return obj


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "a string":
        return isinstance(value, str)
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, Mapping)


def req_str(payload: Mapping[str, Any], dotted: str) -> str:
    """The string at the dotted key; PayloadError when missing or not a string."""
    value: str = _required(payload, dotted, "a string")
    return value


def req_int(payload: Mapping[str, Any], dotted: str) -> int:
    """The integer at the dotted key; PayloadError when missing or not an integer."""
    value: int = _required(payload, dotted, "an integer")
    return value


def req_obj(payload: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    """The object at the dotted key; PayloadError when missing or not an object."""
    value: Mapping[str, Any] = _required(payload, dotted, "an object")
    return value


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return "null" if value is None else type(value).__name__


def repo_names(payload: Mapping[str, Any]) -> tuple[str, str]:
    """``(org, repo)``: repository.owner.login and repository.name, both required."""
    name = req_str(payload, "repository.name")
    org = req_str(payload, "repository.owner.login")
    return org, name


def title(kind: str, payload: Mapping[str, Any]) -> str:
    """mapping.md: title = "<t> received from <html>", html = repository.html_url."""
    return f"{kind} received from {opt_str(payload, 'repository', 'html_url') or ''}"


def sender_fields(payload: Mapping[str, Any], login: str | None) -> dict[str, Any]:
    """clone, sender and sender_scm_id, carried by every build body (mapping.md)."""
    scm_id = opt_int(payload, "sender", "id")
    return {
        "clone": opt_str(payload, "repository", "clone_url"),
        "sender": login,
        "sender_scm_id": None if scm_id is None else str(scm_id),
    }


def first_nonempty(*values: str | None) -> str | None:
    """The first non-empty string, else None (Vela's "else" fallbacks test len == 0)."""
    return next((value for value in values if value), None)


def skip_marker(message: str) -> str | None:
    """The first [skip ci]-style marker in the message, case-insensitively, or None."""
    lowered = message.lower()
    return next((m for m in SKIP_MARKERS if m in lowered), None)


def unix_seconds(stamp: str | None) -> int:
    """An ISO 8601 time as Unix seconds (naive times taken as UTC), 0 if unreadable."""
    if not stamp:
        return 0
    try:
        moment = datetime.fromisoformat(stamp)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp())
    except (ValueError, OverflowError, OSError):
        return 0


def json_text(value: Any) -> str:
    """A deploy parameter as Vela's map[string]string wants it (mapping.md, deployment).

    Strings stay as they are; anything else becomes compact JSON text.
    """
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"deployment.payload: value not representable: {exc}") from None


def drop_none(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without the fields whose source was null or absent (mapping.md)."""
    return {key: value for key, value in body.items() if value is not None}
