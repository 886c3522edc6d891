"""GitHub ``pull_request`` → a Vela ``pull_request`` build (mapping.md, "pull_request")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from bridge.convert._common import (
    Draft,
    drop_none,
    opt_obj,
    opt_str,
    req_int,
    req_obj,
    req_str,
    sender_fields,
    title,
)

# mapping.md: forward only open pull requests, and only these actions.
FORWARDED_ACTIONS = frozenset(
    {"opened", "synchronize", "reopened", "edited", "labeled", "unlabeled"}
)

# mapping.md, "bridge - fork policy": who counts as trusted under "trusted".
TRUSTED_ASSOCIATIONS = frozenset({"OWNER", "MEMBER", "COLLABORATOR"})

ForkPolicy = Literal["trusted", "never", "always"]


def convert_pull_request(
    payload: Mapping[str, Any], *, fork_policy: ForkPolicy, force: bool
) -> Draft:
    """The build body for a pull_request delivery, or the reason it is skipped."""
    req_obj(payload, "sender")
    action = req_str(payload, "action")
    number = req_int(payload, "number")
    head_sha = req_str(payload, "pull_request.head.sha")
    base_ref = req_str(payload, "pull_request.base.ref")
    pr = opt_obj(payload, "pull_request")
    ref = f"refs/pull/{number}/head"
    body = drop_none(
        {
            "event": "pull_request",
            "event_action": action,
            "title": title("pull_request", payload),
            "commit": head_sha,
            "ref": ref,
            "branch": base_ref,
            "base_ref": base_ref,
            "head_ref": opt_str(pr, "head", "ref"),
            "message": opt_str(pr, "title") or "",
            "source": opt_str(pr, "html_url"),
            "author": opt_str(pr, "user", "login"),
            "email": opt_str(pr, "user", "email"),
            "fork": _fork_field(pr),
            **sender_fields(payload, opt_str(payload, "sender", "login")),
        }
    )
    skip = _action_skip(action, opt_str(pr, "state"))
    if skip is None and not force:
        skip = _fork_policy_skip(pr, fork_policy)
    return Draft(body=body, lane=ref, skip=skip)


def _fork_field(pr: Mapping[str, Any] | None) -> bool:
    """Vela's formula: head repo is a fork with another full name; False without head.repo."""
    head_repo = opt_obj(pr, "head", "repo")
    if head_repo is None:
        return False
    head_name = opt_str(head_repo, "full_name") or ""
    base_name = opt_str(pr, "base", "repo", "full_name") or ""
    return head_repo.get("fork") is True and head_name.lower() != base_name.lower()


def _action_skip(action: str, state: str | None) -> str | None:
    """mapping.md: only open pull requests with a forwarded action make a build."""
    if action not in FORWARDED_ACTIONS:
        return f"pull_request action {action} is not forwarded"
    if state != "open":
        shown = state or "non-open"
        return f"pull_request action {action} on a {shown} pull request is not forwarded"
    return None


def _fork_policy_skip(pr: Mapping[str, Any] | None, policy: ForkPolicy) -> str | None:
    """mapping.md, "bridge - fork policy"; a missing head.repo (deleted fork) is a fork here."""
    if policy == "always":
        return None
    if opt_obj(pr, "head", "repo") is not None and not _fork_field(pr):
        return None
    if policy == "never":
        return (
            "pull request from a fork is held (events.fork_pull_requests = never); "
            "restart it to forward"
        )
    association = opt_str(pr, "author_association")
    if association in TRUSTED_ASSOCIATIONS:
        return None
    if association:
        article = "an" if association[0] in "AEIOU" else "a"
        who = f"{article} {association}"
    else:
        who = "an author of unknown association"
    return (
        f"pull request from a fork by {who} is held "
        "(events.fork_pull_requests = trusted); restart it to forward"
    )
