"""GitHub ``deployment`` → a Vela ``deployment`` build, or a request to Vela's
deployment API (mapping.md, "deployment")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.convert._common import (
    Draft,
    drop_none,
    json_text,
    json_type,
    opt_obj,
    opt_str,
    req_int,
    req_obj,
    req_str,
    sender_fields,
    title,
)
from bridge.errors import PayloadError


def convert_deployment(payload: Mapping[str, Any]) -> Draft:
    """The build body for a deployment delivery (events.deployment = "build").

    Every action is forwarded, and none at all (older GitHub Enterprise Server).
    """
    req_obj(payload, "sender")
    number = req_int(payload, "deployment.id")
    if not -(2**63) <= number < 2**63:
        # Vela's deploy_number is an int64.
        raise PayloadError("deployment.id: out of range")
    sha = req_str(payload, "deployment.sha")
    dep_ref = req_str(payload, "deployment.ref")
    environment = req_str(payload, "deployment.environment")
    params = deploy_payload(payload)
    dep = opt_obj(payload, "deployment")
    branch, ref = _branch_and_ref(payload, sha, dep_ref)
    body = drop_none(
        {
            "event": "deployment",
            "event_action": "created",
            "title": title("deployment", payload),
            "deploy": environment,
            "deploy_number": number,
            "deploy_payload": params,
            "commit": sha,
            "ref": ref,
            "branch": branch,
            "message": opt_str(dep, "description") or "",
            "source": opt_str(dep, "url"),
            "author": opt_str(dep, "creator", "login"),
            "email": opt_str(dep, "creator", "email"),
            **sender_fields(payload, opt_str(payload, "sender", "login")),
        }
    )
    return Draft(body=body, lane=f"deploy:{environment}", skip=None)


def deployment_api_body(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The body for POST /api/v1/deployments/{org}/{repo} (events.deployment = "deployment").

    Call after ``convert_deployment``, which validates the required keys.
    """
    dep = opt_obj(payload, "deployment")
    return drop_none(
        {
            "ref": opt_str(dep, "ref"),
            "target": opt_str(dep, "environment"),
            "task": opt_str(dep, "task"),
            "description": opt_str(dep, "description"),
            "payload": deploy_payload(payload),
        }
    )


def deploy_payload(payload: Mapping[str, Any]) -> dict[str, str] | None:
    """mapping.md, deploy_payload: a non-empty object as Vela's map[string]string.

    None (field left out) for an empty object, null or absent. Non-string values
    become compact JSON text; a payload that is not an object is a 400.
    """
    dep = opt_obj(payload, "deployment")
    raw = None if dep is None else dep.get("payload")
    # GitHub Enterprise Server sometimes sends "" for "no payload": read as empty,
    # the same as the {} that github.com sends, rather than refusing the delivery.
    if raw is None or raw == "":
        return None
    if not isinstance(raw, Mapping):
        raise PayloadError(f"deployment.payload: expected an object, got {json_type(raw)}")
    return {str(key): json_text(value) for key, value in raw.items()} or None


def _branch_and_ref(
    payload: Mapping[str, Any], sha: str, dep_ref: str
) -> tuple[str | None, str | None]:
    """mapping.md, deployment: branch and ref from deployment.ref."""
    if sha.startswith(dep_ref):
        # The ref is the commit SHA (or a prefix of it): build the default branch.
        default = opt_str(payload, "repository", "default_branch")
        return default, None if default is None else f"refs/heads/{default}"
    if dep_ref.startswith("refs/"):
        return dep_ref, dep_ref
    return dep_ref, f"refs/heads/{dep_ref}"
