"""GitHub delivery → Vela requests: the pure core of the bridge (spec/mapping.md).

No I/O, no clock, no environment: ``convert(event, payload, policy)`` returns a
``Conversion`` (the requests to send, or the reason nothing is sent, plus the
summary the operator API shows), or raises ``PayloadError`` when the payload
lacks a key mapping.md reads unconditionally (interface.md: 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from bridge.convert._common import Draft, opt_str, repo_names
from bridge.convert.deployment import convert_deployment, deployment_api_body
from bridge.convert.fields import read_payload
from bridge.convert.pull_request import convert_pull_request
from bridge.convert.push import convert_push
from bridge.errors import PayloadError

__all__ = ["Conversion", "Policy", "Summary", "VelaRequest", "convert", "read_payload"]


@dataclass(frozen=True, slots=True)
class Policy:
    """The config's ``events`` table, as far as conversion needs it."""

    deployment: Literal["build", "deployment"] = "build"
    fork_pull_requests: Literal["trusted", "never", "always"] = "trusted"


@dataclass(frozen=True, slots=True)
class VelaRequest:
    """One request to Vela: where it goes, its JSON body and its ordering lane.

    A deployment-API request also carries ``fallback``, the build body to send
    instead when the deployment turns out to be Vela's own (mapping.md, deployment).
    """

    endpoint: Literal["builds", "deployments"]
    org: str
    repo: str
    path: str
    body: Mapping[str, Any]
    order_key: str
    fallback: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """What the operator API shows for a delivery (operator-api.md, build object)."""

    repo: str
    action: str
    event: str
    commit: str
    branch: str
    ref: str
    remote: str
    message: str
    timestamp: int
    author: str
    author_avatar: str
    author_email: str
    link_url: str


@dataclass(frozen=True, slots=True)
class Conversion:
    """The outcome: requests to send, or none and the reason (``skip``)."""

    summary: Summary
    requests: tuple[VelaRequest, ...]
    skip: str | None


def convert(
    event: str, payload: Mapping[str, Any], policy: Policy, *, force: bool = False
) -> Conversion:
    """Convert one delivery (``event`` is the X-GitHub-Event header).

    ``force`` is an operator restart: the fork policy and [skip ci]-style markers
    are ignored; merge-queue branches, other events and actions are still skipped.
    """
    if not isinstance(payload, Mapping):
        raise PayloadError("payload: expected a JSON object")
    if event not in ("push", "pull_request", "deployment"):
        # mapping.md, "Everything else": skipped, recorded with the reason.
        return Conversion(_bare_summary(payload), (), f"event {event} is not forwarded")

    org, repo = repo_names(payload)
    if event == "push":
        draft = convert_push(payload, force=force)
    elif event == "pull_request":
        draft = convert_pull_request(payload, fork_policy=policy.fork_pull_requests, force=force)
    else:
        draft = convert_deployment(payload)

    summary = _summary(payload, draft, f"{org}/{repo}")
    if draft.skip is not None:
        return Conversion(summary, (), draft.skip)
    order_key = f"{org}/{repo}".lower() + " " + draft.lane
    if event == "deployment" and policy.deployment == "deployment":
        request = VelaRequest(
            endpoint="deployments",
            org=org,
            repo=repo,
            path=f"/api/v1/deployments/{_segment(org)}/{_segment(repo)}",
            body=deployment_api_body(payload),
            order_key=order_key,
            fallback=draft.body,
        )
    else:
        request = VelaRequest(
            endpoint="builds",
            org=org,
            repo=repo,
            path=f"/api/v1/repos/{_segment(org)}/{_segment(repo)}/builds",
            body=draft.body,
            order_key=order_key,
        )
    return Conversion(summary, (request,), None)


def _segment(name: str) -> str:
    return quote(name, safe="")


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    return value if isinstance(value, str) else ""


def _summary(payload: Mapping[str, Any], draft: Draft, repo: str) -> Summary:
    """operator-api.md: the build object's fields, from the converted build body."""
    body = draft.body
    # A deletion's body ref is the before-SHA (Vela's quirk); operators see the git ref.
    ref = draft.lane if body.get("event") == "delete" else _text(body, "ref")
    return Summary(
        repo=repo,
        action=opt_str(payload, "action") or "",
        event=_text(body, "event"),
        commit=_text(body, "commit"),
        branch=_text(body, "branch"),
        ref=ref,
        remote=opt_str(payload, "repository", "clone_url") or "",
        message=_text(body, "message"),
        timestamp=draft.timestamp,
        author=_text(body, "author"),
        author_avatar=opt_str(payload, "sender", "avatar_url") or "",
        author_email=_text(body, "email"),
        link_url=_text(body, "source"),
    )


def _bare_summary(payload: Mapping[str, Any]) -> Summary:
    """What an event the bridge does not forward still tells an operator."""
    org = opt_str(payload, "repository", "owner", "login")
    name = opt_str(payload, "repository", "name")
    return Summary(
        repo=f"{org}/{name}" if org and name else "",
        action=opt_str(payload, "action") or "",
        event="",
        commit="",
        branch="",
        ref="",
        remote=opt_str(payload, "repository", "clone_url") or "",
        message="",
        timestamp=0,
        author=opt_str(payload, "sender", "login") or "",
        author_avatar=opt_str(payload, "sender", "avatar_url") or "",
        author_email="",
        link_url="",
    )
