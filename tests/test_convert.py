"""bridge.convert against recorded and hand-written GitHub payloads (spec/mapping.md)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest

from bridge.convert import Conversion, Policy, Summary, VelaRequest, convert
from bridge.errors import PayloadError

PAYLOADS = Path(__file__).parent / "payloads"
_DELETE = object()


@functools.cache
def _read(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text(encoding="utf-8"))


def load(name: str, **edits: Any) -> Any:
    """A fresh copy of a payload file, with ``edits`` applied: {"a__b": value} sets a.b.

    A value of ``_DELETE`` removes the key.
    """
    payload = copy.deepcopy(_read(name))
    for dotted, value in edits.items():
        *parents, last = dotted.split("__")
        target = payload
        for key in parents:
            target = target[key]
        if value is _DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    return payload


def only_request(conv: Conversion) -> VelaRequest:
    assert conv.skip is None
    assert len(conv.requests) == 1
    return conv.requests[0]


def assert_skipped(conv: Conversion, *fragments: str) -> None:
    assert conv.requests == ()
    assert conv.skip is not None
    for fragment in fragments:
        assert fragment in conv.skip


DEFAULT = Policy()

# --- the Codertocat/Hello-World samples (octokit/webhooks examples) -------------------

HW_CLONE = "https://github.com/Codertocat/Hello-World.git"
HW_BUILDS = "/api/v1/repos/Codertocat/Hello-World/builds"
HW_AVATAR = "https://avatars1.githubusercontent.com/u/21031067?v=4"
HW_EMAIL = "21031067+Codertocat@users.noreply.github.com"
SHA_6113 = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
SHA_F95F = "f95f852bd8fca8fcc58a9a2d6c842781e32a215e"
SHA_EC26 = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
HW_SENDER = {"clone": HW_CLONE, "sender": "Codertocat", "sender_scm_id": "21031067"}

TAG_CREATED_BODY = {
    "event": "tag",
    "title": "push received from https://github.com/Codertocat/Hello-World",
    "commit": SHA_6113,
    "ref": "refs/tags/simple-tag",
    "branch": "refs/tags/simple-tag",  # base_ref null: the ref unchanged
    "message": "Adding a .gitignore file",
    "source": f"https://github.com/Codertocat/Hello-World/commit/{SHA_6113}",
    "author": "Codertocat",
    "email": HW_EMAIL,
    **HW_SENDER,
}
TAG_DELETED_BODY = {
    "event": "delete",
    "event_action": "tag",
    "title": "delete received from https://github.com/Codertocat/Hello-World",
    "commit": SHA_6113,
    "ref": SHA_6113,
    "branch": "simple-tag",
    "message": "simple-tag tag deleted",
    "source": f"https://github.com/Codertocat/Hello-World/commit/{SHA_6113}",
    "author": "Codertocat",
    "email": HW_EMAIL,
    **HW_SENDER,
}
BRANCH_CREATED_BODY = {
    "event": "push",
    "title": "push received from https://github.com/Codertocat/Hello-World",
    "commit": SHA_6113,
    "ref": "refs/heads/master",
    "branch": "master",
    "message": "Initial commit",
    "source": f"https://github.com/Codertocat/Hello-World/commit/{SHA_6113}",
    "author": "Codertocat",
    "email": HW_EMAIL,
    **HW_SENDER,
}
PR_BODY = {
    "event": "pull_request",
    "title": "pull_request received from https://github.com/Codertocat/Hello-World",
    "commit": SHA_EC26,
    "ref": "refs/pull/2/head",
    "branch": "master",
    "base_ref": "master",
    "head_ref": "changes",
    "message": "Update the README with new information.",
    "source": "https://github.com/Codertocat/Hello-World/pull/2",
    "author": "Codertocat",
    "fork": False,
    **HW_SENDER,
}
DEPLOY_BODY = {
    "event": "deployment",
    "event_action": "created",
    "title": "deployment received from https://github.com/Codertocat/Hello-World",
    "deploy": "production",
    "deploy_number": 145988746,
    "commit": SHA_F95F,
    "ref": "refs/heads/master",
    "branch": "master",
    "message": "",
    "source": "https://api.github.com/repos/Codertocat/Hello-World/deployments/145988746",
    "author": "Codertocat",
    **HW_SENDER,
}
DEPLOY_PAGES_BODY = {
    **DEPLOY_BODY,
    "deploy": "github-pages",
    "ref": "refs/heads/gh-pages",
    "branch": "gh-pages",
    "author": "github-pages[bot]",
}


def hw_summary(body: dict[str, Any], action: str = "", timestamp: int = 0) -> Summary:
    """The Summary a Hello-World delivery gets, written out from its expected body."""
    ref = body["ref"]
    if body["event"] == "delete":
        ref = "refs/tags/simple-tag"  # the git ref, not the before-SHA quirk
    return Summary(
        repo="Codertocat/Hello-World",
        action=action,
        event=body["event"],
        commit=body["commit"],
        branch=body["branch"],
        ref=ref,
        remote=HW_CLONE,
        message=body["message"],
        timestamp=timestamp,
        author=body["author"],
        author_avatar=HW_AVATAR,
        author_email=body.get("email", ""),
        link_url=body["source"],
    )


RECORDED_FORWARDED = [
    # file, event, body, order lane, action, head-commit time
    ("push.1.json", "push", TAG_CREATED_BODY, "refs/tags/simple-tag", "", 1557933641),
    ("push.2.json", "push", TAG_DELETED_BODY, "refs/tags/simple-tag", "", 0),
    ("push.3.json", "push", TAG_DELETED_BODY, "refs/tags/simple-tag", "", 0),
    ("push.4.json", "push", TAG_DELETED_BODY, "refs/tags/simple-tag", "", 0),
    ("push.5.json", "push", BRANCH_CREATED_BODY, "refs/heads/master", "", 1557933565),
    ("push.6.json", "push", BRANCH_CREATED_BODY, "refs/heads/master", "", 1557933565),
    ("push.7.json", "push", TAG_DELETED_BODY, "refs/tags/simple-tag", "", 0),
    *[
        (
            f"pull_request.{action}.1.json",
            "pull_request",
            {**PR_BODY, "event_action": action},
            "refs/pull/2/head",
            action,
            0,
        )
        for action in ("opened", "reopened", "synchronize", "labeled", "unlabeled")
    ],
    (
        "pull_request.opened.4.json",
        "pull_request",
        {**PR_BODY, "event_action": "opened"},
        "refs/pull/2/head",
        "opened",
        0,
    ),
    ("deployment.created.1.json", "deployment", DEPLOY_BODY, "deploy:production", "created", 0),
    (
        "deployment.created.2.json",
        "deployment",
        DEPLOY_PAGES_BODY,
        "deploy:github-pages",
        "created",
        0,
    ),
    ("deployment.created.3.json", "deployment", DEPLOY_BODY, "deploy:production", "created", 0),
    ("deployment.created.4.json", "deployment", DEPLOY_BODY, "deploy:production", "created", 0),
]


@pytest.mark.parametrize(
    ("name", "event", "body", "lane", "action", "timestamp"),
    RECORDED_FORWARDED,
    ids=[case[0] for case in RECORDED_FORWARDED],
)
def test_recorded_payload_is_forwarded(
    name: str, event: str, body: dict[str, Any], lane: str, action: str, timestamp: int
) -> None:
    conv = convert(event, load(name), DEFAULT)
    request = only_request(conv)
    assert request.endpoint == "builds"
    assert (request.org, request.repo) == ("Codertocat", "Hello-World")
    assert request.path == HW_BUILDS
    assert request.order_key == f"codertocat/hello-world {lane}"
    assert dict(request.body) == body
    assert conv.summary == hw_summary(body, action, timestamp)


SKIPPED_ACTIONS = [
    "assigned",
    "closed",
    "converted_to_draft",
    "locked",
    "ready_for_review",
    "review_request_removed",
    "review_requested",
    "unassigned",
    "unlocked",
]


@pytest.mark.parametrize("action", SKIPPED_ACTIONS)
def test_recorded_pull_request_action_not_forwarded(action: str) -> None:
    for force in (False, True):
        conv = convert("pull_request", load(f"pull_request.{action}.1.json"), DEFAULT, force=force)
        assert_skipped(conv)
        assert conv.skip == f"pull_request action {action} is not forwarded"
        # The summary is filled all the same.
        assert conv.summary == hw_summary({**PR_BODY, "event_action": action}, action)


RECORDED_OTHER_EVENTS = [
    ("create.1.json", "create", "Codertocat/Hello-World", ""),
    ("delete.1.json", "delete", "Codertocat/Hello-World", ""),
    ("deployment_status.created.1.json", "deployment_status", "Codertocat/Hello-World", "created"),
    ("installation.created.1.json", "installation", "", "created"),
    ("issue_comment.created.1.json", "issue_comment", "Codertocat/Hello-World", "created"),
    ("ping.1.json", "ping", "Octocoders/Hello-World", ""),
]


@pytest.mark.parametrize(("name", "event", "repo", "action"), RECORDED_OTHER_EVENTS)
def test_recorded_other_event_not_forwarded(name: str, event: str, repo: str, action: str) -> None:
    payload = load(name)
    conv = convert(event, payload, DEFAULT)
    assert_skipped(conv)
    assert conv.skip == f"event {event} is not forwarded"
    assert conv.summary.repo == repo
    assert conv.summary.action == action
    assert conv.summary.event == ""
    assert conv.summary.remote == (f"https://github.com/{repo}.git" if repo else "")
    assert conv.summary.author == payload["sender"]["login"]
    assert conv.summary.author_avatar == payload["sender"]["avatar_url"]


def test_deployment_mode_on_recorded_payload() -> None:
    conv = convert("deployment", load("deployment.created.1.json"), Policy(deployment="deployment"))
    request = only_request(conv)
    assert request.endpoint == "deployments"
    assert request.path == "/api/v1/deployments/Codertocat/Hello-World"
    assert request.order_key == "codertocat/hello-world deploy:production"
    # description null and payload {} are left out
    assert dict(request.body) == {"ref": "master", "target": "production", "task": "deploy"}
    assert conv.summary == hw_summary(DEPLOY_BODY, "created")


# --- hand-written payloads: octo-org/web.app -------------------------------------------

WA_BUILDS = "/api/v1/repos/octo-org/web.app/builds"
WA_HTML = "https://github.com/octo-org/web.app"
WA_CLONE = "https://github.com/octo-org/web.app.git"
SHA_2DEB = "2deb7e0d0cbac357eeb110c8a2f2f32ce037e0d5"
SHA_9049 = "9049f1265b7d61be4a8904a9a27120d2064dab3b"
OCTOCAT = {"clone": WA_CLONE, "sender": "octocat", "sender_scm_id": "583231"}


def test_push_to_slashed_branch() -> None:
    conv = convert("push", load("hand.push.feature-branch.json"), DEFAULT)
    request = only_request(conv)
    assert request.path == WA_BUILDS
    assert request.order_key == "octo-org/web.app refs/heads/feature/a/b"
    assert dict(request.body) == {
        "event": "push",
        "title": f"push received from {WA_HTML}",
        "commit": SHA_2DEB,
        "ref": "refs/heads/feature/a/b",
        "branch": "feature/a/b",
        "message": "Fix login form validation\n\nThe e-mail field accepted blanks.",
        "source": f"{WA_HTML}/commit/{SHA_2DEB}",
        "author": "Mona Lisa",  # no author.username: committer.name
        "email": "mona@example.com",
        **OCTOCAT,
    }
    assert conv.summary == Summary(
        repo="octo-org/web.app",
        action="",
        event="push",
        commit=SHA_2DEB,
        branch="feature/a/b",
        ref="refs/heads/feature/a/b",
        remote=WA_CLONE,
        message="Fix login form validation\n\nThe e-mail field accepted blanks.",
        timestamp=1732262400,  # 2024-11-22T09:00:00+01:00
        author="Mona Lisa",
        author_avatar="https://avatars.githubusercontent.com/u/583231?v=4",
        author_email="mona@example.com",
        link_url=f"{WA_HTML}/commit/{SHA_2DEB}",
    )


def test_branch_deletion() -> None:
    conv = convert("push", load("hand.push.branch-deleted.json"), DEFAULT)
    request = only_request(conv)
    assert request.order_key == "octo-org/web.app refs/heads/feature/a/b"
    assert dict(request.body) == {
        "event": "delete",
        "event_action": "branch",
        "title": f"delete received from {WA_HTML}",
        "commit": SHA_2DEB,
        "ref": SHA_2DEB,
        "branch": "feature/a/b",
        "message": "feature/a/b branch deleted",
        "source": f"{WA_HTML}/commit/{SHA_2DEB}",
        "author": "octocat",
        "email": "octocat@example.com",
        **OCTOCAT,
    }
    assert conv.summary.event == "delete"
    assert conv.summary.ref == "refs/heads/feature/a/b"
    assert conv.summary.timestamp == 0


@pytest.mark.parametrize(
    ("edits", "event_action"),
    [
        ({"deleted": False}, "branch"),  # head_commit null alone means deletion
        ({"deleted": _DELETE}, "branch"),
        ({"deleted": False, "head_commit": _DELETE}, "branch"),
        ({"ref": "refs/tags/v1.2.0"}, "tag"),
    ],
)
def test_deletion_is_recognised(edits: dict[str, Any], event_action: str) -> None:
    body = only_request(convert("push", load("hand.push.branch-deleted.json", **edits), DEFAULT))
    assert body.body["event"] == "delete"
    assert body.body["event_action"] == event_action


def test_deleted_true_wins_over_a_head_commit() -> None:
    payload = load("hand.push.feature-branch.json", deleted=True)
    body = only_request(convert("push", payload, DEFAULT)).body
    assert body["event"] == "delete"
    assert body["message"] == "feature/a/b branch deleted"
    assert body["commit"] == SHA_9049


def test_tag_pushed_from_main() -> None:
    conv = convert("push", load("hand.push.tag-from-main.json"), DEFAULT)
    request = only_request(conv)
    assert request.order_key == "octo-org/web.app refs/tags/v1.2.0"
    assert dict(request.body) == {
        "event": "tag",
        "title": f"push received from {WA_HTML}",
        "commit": SHA_2DEB,
        "ref": "refs/tags/v1.2.0",
        "branch": "main",
        "base_ref": "refs/heads/main",
        "message": "Release 1.2.0",
        "source": f"{WA_HTML}/commit/{SHA_2DEB}",
        "author": "monalisa",
        "email": "mona@example.com",
        "clone": WA_CLONE,
        "sender": "monalisa",
        "sender_scm_id": "2",
    }
    assert conv.summary.timestamp == 1732262400


@pytest.mark.parametrize(
    ("base_ref", "branch"),
    [
        ("refs/heads/main", "main"),
        ("refs/heads/release/1.x", "release/1.x"),
        (None, "refs/tags/v1.2.0"),
        ("refs/tags/v1.1.0", "refs/tags/v1.2.0"),
    ],
)
def test_tag_branch_comes_from_base_ref(base_ref: str | None, branch: str) -> None:
    payload = load("hand.push.tag-from-main.json", base_ref=base_ref)
    body = only_request(convert("push", payload, DEFAULT)).body
    assert body["branch"] == branch
    assert body.get("base_ref") == base_ref


@pytest.mark.parametrize(
    ("message", "marker"),
    [
        ("Fix typo [skip ci]", "[skip ci]"),
        ("Fix typo [CI SKIP]", "[ci skip]"),
        ("***NO_CI*** docs only", "***no_ci***"),
        ("[Skip Vela] wip", "[skip vela]"),
        ("wip\n\n[vela skip]", "[vela skip]"),
    ],
)
@pytest.mark.parametrize("name", ["hand.push.feature-branch.json", "hand.push.tag-from-main.json"])
def test_skip_markers(name: str, message: str, marker: str) -> None:
    payload = load(name, head_commit__message=message)
    conv = convert("push", payload, DEFAULT)
    assert_skipped(conv)
    assert conv.skip == f"commit message contains {marker}"
    assert conv.summary.message == message
    # An operator restart forwards it anyway.
    forced = only_request(convert("push", payload, DEFAULT, force=True))
    assert forced.body["message"] == message


@pytest.mark.parametrize("message", ["skip ci", "[skip-ci]", "ci skip please", "NO_CI"])
def test_near_miss_markers_are_forwarded(message: str) -> None:
    payload = load("hand.push.feature-branch.json", head_commit__message=message)
    only_request(convert("push", payload, DEFAULT))


def test_merge_queue_branch_is_skipped_even_when_forced() -> None:
    branch = "gh-readonly-queue/main/pr-42-9049f1265b7d61be4a8904a9a27120d2064dab3b"
    for name in ("hand.push.feature-branch.json", "hand.push.branch-deleted.json"):
        payload = load(name, ref=f"refs/heads/{branch}")
        for force in (False, True):
            conv = convert("push", payload, DEFAULT, force=force)
            assert_skipped(conv)
            assert conv.skip == f"merge queue branch {branch} is skipped"
            assert conv.summary.branch == branch


# --- pull requests from forks: mapping.md "bridge - fork policy" -----------------------

FORK_PR_BODY = {
    "event": "pull_request",
    "event_action": "synchronize",
    "title": f"pull_request received from {WA_HTML}",
    "commit": SHA_2DEB,
    "ref": "refs/pull/42/head",
    "branch": "main",
    "base_ref": "main",
    "head_ref": "feature/login",
    "message": "Fix login form validation",
    "source": f"{WA_HTML}/pull/42",
    "author": "contributor",
    "fork": True,
    "clone": WA_CLONE,
    "sender": "contributor",
    "sender_scm_id": "77",
}


@pytest.mark.parametrize(
    ("policy", "association", "force", "held"),
    [
        ("trusted", "CONTRIBUTOR", False, "by a CONTRIBUTOR is held (events.fork_pull_requests"),
        ("trusted", "FIRST_TIME_CONTRIBUTOR", False, "by a FIRST_TIME_CONTRIBUTOR is held"),
        ("trusted", "NONE", False, "by a NONE is held"),
        ("trusted", None, False, "by an author of unknown association is held"),
        ("trusted", "OWNER", False, None),
        ("trusted", "MEMBER", False, None),
        ("trusted", "COLLABORATOR", False, None),
        ("trusted", "CONTRIBUTOR", True, None),
        ("never", "CONTRIBUTOR", False, "events.fork_pull_requests = never"),
        ("never", "OWNER", False, "events.fork_pull_requests = never"),
        ("never", "CONTRIBUTOR", True, None),
        ("always", "CONTRIBUTOR", False, None),
        ("always", "NONE", False, None),
    ],
)
def test_fork_policy(policy: Any, association: str | None, force: bool, held: str | None) -> None:
    payload = load("hand.pull_request.fork.json", pull_request__author_association=association)
    conv = convert("pull_request", payload, Policy(fork_pull_requests=policy), force=force)
    if held is not None:
        assert_skipped(conv, held, "restart it to forward")
    else:
        request = only_request(conv)
        assert request.order_key == "octo-org/web.app refs/pull/42/head"
        assert dict(request.body) == FORK_PR_BODY
    assert conv.summary.event == "pull_request"
    assert conv.summary.commit == SHA_2DEB


@pytest.mark.parametrize(
    ("policy", "association", "forwarded"),
    [
        ("trusted", "CONTRIBUTOR", False),
        ("trusted", "MEMBER", True),
        ("never", "OWNER", False),
        ("always", "CONTRIBUTOR", True),
    ],
)
def test_fork_with_deleted_head_repo(policy: Any, association: str, forwarded: bool) -> None:
    payload = load("hand.pull_request.fork.json", pull_request__author_association=association)
    payload["pull_request"]["head"]["repo"] = None
    conv = convert("pull_request", payload, Policy(fork_pull_requests=policy))
    if forwarded:
        # Vela's formula: no head.repo, no fork.
        assert dict(only_request(conv).body) == {**FORK_PR_BODY, "fork": False}
    else:
        assert_skipped(conv, "from a fork")


@pytest.mark.parametrize(
    ("head_full_name", "head_fork", "fork"),
    [
        ("contributor/web.app", True, True),
        ("Octo-Org/Web.App", True, False),  # same repository, any case
        ("contributor/web.app", False, False),
        (None, True, True),  # no full name: differs from the base's
    ],
)
def test_fork_field_formula(head_full_name: str | None, head_fork: bool, fork: bool) -> None:
    payload = load("hand.pull_request.fork.json")
    payload["pull_request"]["head"]["repo"].update(full_name=head_full_name, fork=head_fork)
    conv = convert("pull_request", payload, Policy(fork_pull_requests="always"))
    assert only_request(conv).body["fork"] is fork


@pytest.mark.parametrize("policy", ["trusted", "never", "always"])
def test_same_repository_pull_request_ignores_fork_policy(policy: Any) -> None:
    payload = load("pull_request.opened.1.json", pull_request__author_association="NONE")
    request = only_request(convert("pull_request", payload, Policy(fork_pull_requests=policy)))
    assert request.body["fork"] is False


@pytest.mark.parametrize("state", ["closed", None, 3])
def test_pull_request_not_open_is_not_forwarded(state: Any) -> None:
    payload = load("hand.pull_request.fork.json", action="edited", pull_request__state=state)
    conv = convert("pull_request", payload, Policy(fork_pull_requests="always"), force=True)
    assert_skipped(conv, "pull_request action edited on a ", "is not forwarded")


def test_pull_request_user_email_is_sent_when_present() -> None:
    payload = load("pull_request.opened.1.json", pull_request__user__email="cat@example.com")
    conv = convert("pull_request", payload, DEFAULT)
    assert only_request(conv).body["email"] == "cat@example.com"
    assert conv.summary.author_email == "cat@example.com"


# --- deployments -------------------------------------------------------------------------

GHES_HTML = "https://ghe.example.com/octo-org/web.app"
GHES_CLONE = "https://ghe.example.com/octo-org/web.app.git"
GHES_PARAMS = {
    "region": "eu-west-1",
    "replicas": "3",
    "ratio": "0.5",
    "dry_run": "true",
    "limits": '{"cpu":"2","memory":null}',
    "zones": '["a","b"]',
    "note": "null",
    "greeting": '{"text":"grüß dich"}',
}
GHES_BODY = {
    "event": "deployment",
    "event_action": "created",  # even without an action (GitHub Enterprise Server)
    "title": f"deployment received from {GHES_HTML}",
    "deploy": "production",
    "deploy_number": 7001,
    "deploy_payload": GHES_PARAMS,
    "commit": SHA_2DEB,
    "ref": "refs/heads/v1.2.0",  # a tag name is taken for a branch: Vela's rule
    "branch": "v1.2.0",
    "message": "Ship 1.2.0",
    "source": "https://ghe.example.com/api/v3/repos/octo-org/web.app/deployments/7001",
    "author": "monalisa",
    "email": "mona@example.com",
    "clone": GHES_CLONE,
    "sender": "monalisa",
    "sender_scm_id": "2",
}


def test_deployment_from_enterprise_server_without_action() -> None:
    conv = convert("deployment", load("hand.deployment.ghes.json"), DEFAULT)
    request = only_request(conv)
    assert request.endpoint == "builds"
    assert request.path == WA_BUILDS
    assert request.order_key == "octo-org/web.app deploy:production"
    assert dict(request.body) == GHES_BODY
    assert conv.summary == Summary(
        repo="octo-org/web.app",
        action="",
        event="deployment",
        commit=SHA_2DEB,
        branch="v1.2.0",
        ref="refs/heads/v1.2.0",
        remote=GHES_CLONE,
        message="Ship 1.2.0",
        timestamp=0,
        author="monalisa",
        author_avatar="https://ghe.example.com/avatars/u/2?v=4",
        author_email="mona@example.com",
        link_url="https://ghe.example.com/api/v3/repos/octo-org/web.app/deployments/7001",
    )


def test_deployment_mode_body() -> None:
    conv = convert("deployment", load("hand.deployment.ghes.json"), Policy(deployment="deployment"))
    request = only_request(conv)
    assert request.endpoint == "deployments"
    assert (request.org, request.repo) == ("octo-org", "web.app")
    assert request.path == "/api/v1/deployments/octo-org/web.app"
    assert request.order_key == "octo-org/web.app deploy:production"
    assert dict(request.body) == {
        "ref": "v1.2.0",
        "target": "production",
        "task": "deploy:migrations",
        "description": "Ship 1.2.0",
        "payload": GHES_PARAMS,
    }
    # The summary still describes the build the deployment stands for.
    assert conv.summary.event == "deployment"
    assert conv.summary.branch == "v1.2.0"


def test_deployment_mode_leaves_out_null_fields() -> None:
    payload = load("hand.deployment.ghes.json", deployment__description=None)
    payload["deployment"].update(task=None, payload={})
    body = only_request(convert("deployment", payload, Policy(deployment="deployment"))).body
    assert dict(body) == {"ref": "v1.2.0", "target": "production"}


@pytest.mark.parametrize(
    ("ref", "branch", "vela_ref"),
    [
        (SHA_2DEB, "main", "refs/heads/main"),  # the ref is the SHA: default branch
        ("2deb7e0", "main", "refs/heads/main"),  # a short SHA
        ("main", "main", "refs/heads/main"),
        ("feature/a/b", "feature/a/b", "refs/heads/feature/a/b"),
        ("v1.2.0", "v1.2.0", "refs/heads/v1.2.0"),
        ("refs/tags/v1.2.0", "refs/tags/v1.2.0", "refs/tags/v1.2.0"),
        ("refs/heads/main", "refs/heads/main", "refs/heads/main"),
    ],
)
def test_deployment_branch_and_ref(ref: str, branch: str, vela_ref: str) -> None:
    payload = load("hand.deployment.ghes.json", deployment__ref=ref)
    body = only_request(convert("deployment", payload, DEFAULT)).body
    assert (body["branch"], body["ref"]) == (branch, vela_ref)


def test_deployment_sha_ref_without_default_branch_leaves_both_out() -> None:
    payload = load("hand.deployment.ghes.json", deployment__ref=SHA_2DEB)
    del payload["repository"]["default_branch"]
    body = only_request(convert("deployment", payload, DEFAULT)).body
    assert "branch" not in body
    assert "ref" not in body


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, None),
        (None, None),
        (_DELETE, None),
        ("", None),  # GitHub Enterprise Server's "no payload"
        ({"a": "b"}, {"a": "b"}),
        ({"flag": False, "n": -1, "x": 1.25}, {"flag": "false", "n": "-1", "x": "1.25"}),
        ({"nested": {"a": 1, "b": [True, None]}}, {"nested": '{"a":1,"b":[true,null]}'}),
        ({"empty": {}, "none": None, "s": ""}, {"empty": "{}", "none": "null", "s": ""}),
    ],
)
def test_deploy_payload(raw: Any, expected: dict[str, str] | None) -> None:
    payload = load("hand.deployment.ghes.json", deployment__payload=raw)
    build = only_request(convert("deployment", payload, DEFAULT)).body
    deployment = only_request(convert("deployment", payload, Policy(deployment="deployment"))).body
    assert build.get("deploy_payload") == expected
    assert deployment.get("payload") == expected


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("region=eu", "a string"), (["a"], "an array"), (3, "a number"), (True, "a boolean")],
)
def test_deploy_payload_that_is_not_an_object_is_refused(raw: Any, kind: str) -> None:
    payload = load("hand.deployment.ghes.json", deployment__payload=raw)
    for policy in (DEFAULT, Policy(deployment="deployment")):
        with pytest.raises(
            PayloadError, match=f"deployment.payload: expected an object, got {kind}"
        ):
            convert("deployment", payload, policy)


# --- keys read unconditionally (interface.md, "Webhook intake") -----------------------

REQUIRED = [
    # file, event, dotted key
    *[
        (name, event, key)
        for name, event in [
            ("hand.push.feature-branch.json", "push"),
            ("pull_request.opened.1.json", "pull_request"),
            ("deployment.created.1.json", "deployment"),
        ]
        for key in ("repository", "repository.name", "repository.owner", "repository.owner.login")
    ],
    ("hand.push.feature-branch.json", "push", "ref"),
    ("pull_request.opened.1.json", "pull_request", "sender"),
    ("pull_request.opened.1.json", "pull_request", "action"),
    ("pull_request.opened.1.json", "pull_request", "number"),
    ("pull_request.opened.1.json", "pull_request", "pull_request"),
    ("pull_request.opened.1.json", "pull_request", "pull_request.head"),
    ("pull_request.opened.1.json", "pull_request", "pull_request.head.sha"),
    ("pull_request.opened.1.json", "pull_request", "pull_request.base.ref"),
    ("deployment.created.1.json", "deployment", "sender"),
    ("deployment.created.1.json", "deployment", "deployment"),
    ("deployment.created.1.json", "deployment", "deployment.id"),
    ("deployment.created.1.json", "deployment", "deployment.sha"),
    ("deployment.created.1.json", "deployment", "deployment.ref"),
    ("deployment.created.1.json", "deployment", "deployment.environment"),
]


def _named_key(key: str) -> str:
    """The key the error names: the leaf that is read (repository → repository.name)."""
    leaves = {
        "repository": "repository.name",
        "repository.owner": "repository.owner.login",
        "pull_request": "pull_request.head.sha",
        "pull_request.head": "pull_request.head.sha",
        "deployment": "deployment.id",
    }
    return leaves.get(key, key)


def _set(payload: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        payload = payload[key]
    if value is _DELETE:
        del payload[last]
    else:
        payload[last] = value


@pytest.mark.parametrize("value", [_DELETE, None], ids=["absent", "null"])
@pytest.mark.parametrize(("name", "event", "key"), REQUIRED)
def test_missing_required_key(name: str, event: str, key: str, value: Any) -> None:
    payload = load(name)
    _set(payload, key, value)
    with pytest.raises(PayloadError, match=rf"^{_named_key(key)}: missing"):
        convert(event, payload, DEFAULT)


def _wrong_value(key: str) -> list[Any]:
    if key.endswith((".id", "number")):
        return ["2", True, 2.0]
    if key in ("sender", "repository", "repository.owner", "pull_request", "deployment"):
        return ["x", [1], 5]
    if key == "pull_request.head":
        return ["x"]
    return [5, True, ["refs/heads/x"], {"a": 1}]


WRONG_TYPED = [(*case, value) for case in REQUIRED for value in _wrong_value(case[2])]


@pytest.mark.parametrize(("name", "event", "key", "value"), WRONG_TYPED)
def test_wrong_typed_required_key(name: str, event: str, key: str, value: Any) -> None:
    payload = load(name)
    _set(payload, key, value)
    with pytest.raises(PayloadError, match=rf"^{_named_key(key)}: "):
        convert(event, payload, DEFAULT)


def test_push_sender_falls_back_to_pusher_name() -> None:
    payload = load("hand.push.feature-branch.json", sender=_DELETE)
    conv = convert("push", payload, DEFAULT)
    body = only_request(conv).body
    assert body["sender"] == "octocat"
    assert "sender_scm_id" not in body
    assert conv.summary.author_avatar == ""


@pytest.mark.parametrize("pusher", [_DELETE, None, {}, {"name": 5}])
def test_push_without_sender_or_pusher_name(pusher: Any) -> None:
    payload = load("hand.push.feature-branch.json", sender=_DELETE, pusher=pusher)
    with pytest.raises(PayloadError, match=r"^sender: missing"):
        convert("push", payload, DEFAULT)


@pytest.mark.parametrize("payload", [[], "push", None, 3, [{"ref": "refs/heads/main"}]])
@pytest.mark.parametrize("event", ["push", "pull_request", "deployment", "issues"])
def test_payload_that_is_not_an_object(payload: Any, event: str) -> None:
    with pytest.raises(PayloadError, match=r"^payload: "):
        convert(event, payload, DEFAULT)


@pytest.mark.parametrize(
    "payload",
    [{}, {"repository": 5, "sender": []}, {"repository": {"owner": {"login": 1}}, "action": 7}],
)
@pytest.mark.parametrize("event", ["issues", "check_run", "ping", "merge_group", ""])
def test_unknown_event_never_raises(payload: Any, event: str) -> None:
    conv = convert(event, payload, DEFAULT, force=True)
    assert_skipped(conv, f"event {event} is not forwarded")
    assert conv.summary == Summary("", "", "", "", "", "", "", "", 0, "", "", "", "")


# --- optional keys of the wrong type count as missing ----------------------------------


PUSH = ("hand.push.feature-branch.json", "push")
DELETION = ("hand.push.branch-deleted.json", "push")
PULL = ("pull_request.opened.1.json", "pull_request")
DEPLOY = ("deployment.created.1.json", "deployment")


@pytest.mark.parametrize(
    ("name", "event", "key", "value", "check"),
    [
        (*PUSH, "head_commit.message", 5, {"message": ""}),
        (*PUSH, "head_commit.message", None, {"message": ""}),
        (*PUSH, "head_commit.url", [], {"source": None}),
        (*PUSH, "head_commit.id", 12, {"commit": None}),
        (*PUSH, "sender.id", "x", {"sender_scm_id": None}),
        (*PUSH, "sender.id", True, {"sender_scm_id": None}),
        (*PUSH, "sender.login", 9, {"sender": "octocat"}),  # pusher.name
        (*PUSH, "base_ref", 1, {"base_ref": None}),
        (*PUSH, "head_commit.author", "x", {"author": "Mona Lisa"}),
        (*PUSH, "head_commit.committer", None, {"author": None, "email": "mona@example.com"}),
        (*PUSH, "head_commit.timestamp", "yesterday", {}),
        (*PUSH, "repository.html_url", 5, {"title": "push received from "}),
        (*PUSH, "repository.clone_url", None, {"clone": None}),
        (*DELETION, "before", None, {"commit": None, "ref": None, "source": None}),
        (*DELETION, "pusher", "x", {"email": None}),
        (*DELETION, "deleted", "yes", {"event": "delete"}),
        (*PULL, "pull_request.user", None, {"author": None}),
        (*PULL, "pull_request.title", None, {"message": ""}),
        (*PULL, "pull_request.head.ref", 3, {"head_ref": None}),
        (*PULL, "pull_request.head.repo", "x", {"fork": False}),
        (*PULL, "pull_request.html_url", {}, {"source": None}),
        (*PULL, "sender.login", None, {"sender": None}),
        (*DEPLOY, "deployment.description", 4, {"message": ""}),
        (*DEPLOY, "deployment.creator", None, {"author": None}),
        (*DEPLOY, "deployment.url", False, {"source": None}),
        (*DEPLOY, "repository.default_branch", 1, {}),
    ],
)
def test_wrong_typed_optional_key(
    name: str, event: str, key: str, value: Any, check: dict[str, Any]
) -> None:
    payload = load(name)
    _set(payload, key, value)
    body = only_request(convert(event, payload, DEFAULT)).body
    assert None not in body.values()
    json.dumps(body)
    for field, expected in check.items():
        assert body.get(field) == expected


def test_summary_timestamp_is_zero_when_unreadable() -> None:
    payload = load("hand.push.feature-branch.json", head_commit__timestamp="yesterday")
    assert convert("push", payload, DEFAULT).summary.timestamp == 0


def test_path_segments_are_quoted_and_order_key_lowercased() -> None:
    payload = load("hand.push.feature-branch.json")
    payload["repository"]["name"] = "We b%App"
    payload["repository"]["owner"]["login"] = "Octo/Org"
    request = only_request(convert("push", payload, DEFAULT))
    assert request.path == "/api/v1/repos/Octo%2FOrg/We%20b%25App/builds"
    assert (request.org, request.repo) == ("Octo/Org", "We b%App")
    assert request.order_key == "octo/org/we b%app refs/heads/feature/a/b"
    deploy = load("hand.deployment.ghes.json")
    deploy["repository"]["name"] = "a b"
    request = only_request(convert("deployment", deploy, Policy(deployment="deployment")))
    assert request.path == "/api/v1/deployments/octo-org/a%20b"


def test_action_in_summary_only_when_a_string() -> None:
    payload = load("deployment.created.1.json", action=["created"])
    assert convert("deployment", payload, DEFAULT).summary.action == ""


@pytest.mark.parametrize(
    ("name", "event"),
    [
        ("hand.push.feature-branch.json", "push"),
        ("hand.push.branch-deleted.json", "push"),
        ("hand.pull_request.fork.json", "pull_request"),
        ("hand.deployment.ghes.json", "deployment"),
    ],
)
def test_convert_leaves_the_payload_untouched(name: str, event: str) -> None:
    payload = load(name)
    for policy in (DEFAULT, Policy(deployment="deployment", fork_pull_requests="never")):
        convert(event, payload, policy)
    assert payload == _read(name)
