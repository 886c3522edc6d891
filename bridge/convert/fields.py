"""Reading a webhook body: only the fields mapping.md reads, per event.

A push payload is mostly ``commits`` and a ``repository`` of about a hundred keys;
the conversion reads some thirty fields. Decoding into the skeletons below builds
just those, so the rest of the body is checked as JSON but never turned into
Python objects (bench/: this was the intake's single largest cost, in parsing and
then in freeing the objects). What comes out is a plain dict, with the shape the
full decode would have, minus the keys nobody reads; the converters take it as
they take any payload.

A payload whose shape differs from the skeleton (a ``repository`` that is a
string, a top-level array) is decoded again in full, so that the converters give
it the same answer as ever: the skeleton only ever makes intake faster, never
stricter. tests/test_fields.py checks that every key a converter reads, for every
recorded payload, is declared here.
"""

from __future__ import annotations

from typing import Any, TypedDict

import msgspec

from bridge.errors import PayloadError

# Every object is `| None`: GitHub sends null for some (a push's head_commit when a
# branch is deleted, a pull request's head.repo when the fork is gone), and a null
# must not send the payload down the slower full decode. Leaves are Any: the
# converters check types themselves, with messages that name the key.


class _Account(TypedDict, total=False):
    """A GitHub account, whichever role it plays: owner, sender, user, creator."""

    login: Any
    id: Any
    email: Any
    avatar_url: Any


class _Repository(TypedDict, total=False):
    name: Any
    full_name: Any
    owner: _Account | None
    html_url: Any
    clone_url: Any
    default_branch: Any
    fork: Any


class _Common(TypedDict, total=False):
    """What every event shows an operator (convert._bare_summary) and every body carries."""

    action: Any
    repository: _Repository | None
    sender: _Account | None


class _GitUser(TypedDict, total=False):
    name: Any
    email: Any
    username: Any


class _Commit(TypedDict, total=False):
    id: Any
    message: Any
    timestamp: Any
    url: Any
    author: _GitUser | None
    committer: _GitUser | None


class _Push(_Common, total=False):
    ref: Any
    before: Any
    base_ref: Any
    deleted: Any
    head_commit: _Commit | None
    pusher: _GitUser | None


class _Branch(TypedDict, total=False):
    sha: Any
    ref: Any
    repo: _Repository | None


class _PullRequestObject(TypedDict, total=False):
    title: Any
    html_url: Any
    state: Any
    author_association: Any
    user: _Account | None
    head: _Branch | None
    base: _Branch | None


class _PullRequest(_Common, total=False):
    number: Any
    pull_request: _PullRequestObject | None


class _DeploymentObject(TypedDict, total=False):
    id: Any
    sha: Any
    ref: Any
    environment: Any
    task: Any
    description: Any
    url: Any
    payload: Any  # forwarded whole (deploy_payload)
    creator: _Account | None


class _Deployment(_Common, total=False):
    deployment: _DeploymentObject | None


_SKELETONS: dict[str, type] = {
    "push": _Push,
    "pull_request": _PullRequest,
    "deployment": _Deployment,
}
_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    event: msgspec.json.Decoder(skeleton) for event, skeleton in _SKELETONS.items()
}
_COMMON: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_Common)
_ANY = msgspec.json.Decoder()
_NOT_JSON = "body is not valid UTF-8 JSON"


def skeleton(event: str) -> type:
    """The TypedDict of the fields read for ``event`` (other events: the common ones)."""
    return _SKELETONS.get(event, _Common)


def read_payload(event: str, body: bytes) -> dict[str, Any]:
    """The fields of ``body`` that the conversion of ``event`` reads, as a dict.

    PayloadError (400) when the body is not UTF-8 JSON or not a JSON object.
    """
    try:
        # The skeleton decode skips strings it does not keep without checking their
        # UTF-8; GitHub sends UTF-8, and what is not is refused as the full decode would.
        if not body.isascii():
            body.decode("utf-8")
        payload = _DECODERS.get(event, _COMMON).decode(body)
    except msgspec.ValidationError:
        # A shape the skeleton does not describe: the full payload, for the converters
        # to refuse or read as they always have.
        try:
            payload = _ANY.decode(body)
        except (msgspec.DecodeError, RecursionError):
            raise PayloadError(_NOT_JSON) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise PayloadError(_NOT_JSON) from None
    if not isinstance(payload, dict):
        raise PayloadError("body must be a JSON object")
    return payload
