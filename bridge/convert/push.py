"""GitHub ``push`` → a Vela ``push``, ``tag`` or ``delete`` build (mapping.md, "push")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.convert._common import (
    MERGE_QUEUE_PREFIX,
    Draft,
    drop_none,
    first_nonempty,
    opt_obj,
    opt_str,
    req_obj,
    req_str,
    sender_fields,
    skip_marker,
    title,
    unix_seconds,
)

_HEADS = "refs/heads/"
_TAGS = "refs/tags/"


def convert_push(payload: Mapping[str, Any], *, force: bool) -> Draft:
    """The build body for a push delivery, or the reason it is skipped."""
    ref = req_str(payload, "ref")
    login = _sender_login(payload)
    head = opt_obj(payload, "head_commit")
    # mapping.md, push: a deletion is `deleted` true, or `head_commit` null.
    if payload.get("deleted") is True or head is None:
        body = _deletion(payload, ref, login)
        timestamp = unix_seconds(opt_str(head, "timestamp"))
        # Markers are for push and tag only; a deletion has no head commit to carry one.
        skip = _merge_queue_skip(body) if body["event_action"] == "branch" else None
        return Draft(body=body, lane=ref, skip=skip, timestamp=timestamp)

    is_tag = ref.startswith(_TAGS)
    base_ref = opt_str(payload, "base_ref")
    if is_tag:
        # Tag column: the branch the tag was pushed from, when GitHub says so.
        branch = base_ref.removeprefix(_HEADS) if base_ref and base_ref.startswith(_HEADS) else ref
    else:
        branch = ref.removeprefix(_HEADS)
    message = opt_str(head, "message") or ""
    body = drop_none(
        {
            "event": "tag" if is_tag else "push",
            "title": title("push", payload),  # "push" for tags too: Vela's quirk
            "commit": opt_str(head, "id"),
            "ref": ref,
            "branch": branch,
            "base_ref": base_ref,
            "message": message,
            "source": opt_str(head, "url"),
            "author": first_nonempty(
                opt_str(head, "author", "username"), opt_str(head, "committer", "name")
            ),
            "email": first_nonempty(
                opt_str(head, "author", "email"), opt_str(head, "committer", "email")
            ),
            **sender_fields(payload, login),
        }
    )
    skip = None if is_tag else _merge_queue_skip(body)
    if skip is None and not force:
        marker = skip_marker(message)
        if marker is not None:
            skip = f"commit message contains {marker}"
    return Draft(body=body, lane=ref, skip=skip, timestamp=unix_seconds(opt_str(head, "timestamp")))


def _sender_login(payload: Mapping[str, Any]) -> str | None:
    """mapping.md, push: `sender` falls back to `pusher.name` when `sender` is absent."""
    pusher_name = opt_str(payload, "pusher", "name")
    sender = opt_obj(payload, "sender")
    if sender is None and pusher_name is None:
        req_obj(payload, "sender")  # raises PayloadError naming the key
    return first_nonempty(opt_str(sender, "login"), pusher_name)


def _deletion(payload: Mapping[str, Any], ref: str, login: str | None) -> dict[str, Any]:
    """The deletion column of mapping.md's push table."""
    kind = "tag" if ref.startswith(_TAGS) else "branch"
    name = ref.removeprefix(_TAGS) if kind == "tag" else ref.removeprefix(_HEADS)
    before = opt_str(payload, "before")
    html = opt_str(payload, "repository", "html_url")
    return drop_none(
        {
            "event": "delete",
            "event_action": kind,
            "title": title("delete", payload),
            "commit": before,
            "ref": before,  # a SHA, not a ref: Vela's quirk
            "branch": name,
            "message": f"{name} {kind} deleted",
            "source": f"{html}/commit/{before}" if html and before else None,
            # sender.login; when the sender is absent, its pusher.name fallback.
            "author": login,
            "email": opt_str(payload, "pusher", "email"),
            **sender_fields(payload, login),
        }
    )


def _merge_queue_skip(body: Mapping[str, Any]) -> str | None:
    """mapping.md, push: merge-queue branches are skipped (not even a restart sends them)."""
    branch = body.get("branch", "")
    if isinstance(branch, str) and branch.startswith(MERGE_QUEUE_PREFIX):
        return f"merge queue branch {branch} is skipped"
    return None
