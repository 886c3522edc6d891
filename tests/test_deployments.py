"""events.deployment = "deployment": GitHub deployments through Vela's deployment API.

mapping.md, deployment: a deployment made outside Vela becomes a deployment request;
the deployment Vela then creates on GitHub comes back as a webhook (the echo) and
must become exactly one build, never another deployment request.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from tests.fakes.vela import FakeVela, Reply
from tests.support import Bridge, payload

REPO = "Codertocat/Hello-World"
DEPLOY_PATH = f"/api/v1/deployments/{REPO}"
BUILD_PATH = f"/api/v1/repos/{REPO}/builds"
DEPLOYMENT_MODE = {"events": {"deployment": "deployment"}}


def deployment(number: int, environment: str = "production", **fields: Any) -> dict[str, Any]:
    body = copy.deepcopy(payload("deployment.created.1.json"))
    body["deployment"].update(id=number, environment=environment, **fields)
    return body


def posts(vela: FakeVela, path: str) -> list[Any]:
    return [p for p in vela.posts() if p.path == path]


def test_a_deployment_becomes_a_deployment_request(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(**DEPLOYMENT_MODE)
    guid = str(uuid.uuid4())
    sent = deployment(
        77, description="ship it", payload={"region": "eu", "replicas": 3, "canary": True}
    )
    assert bridge.send("deployment", sent, guid=guid).status_code == 202
    stored = bridge.wait_status(guid, "success")
    (request,) = vela.posts()
    assert request.path == DEPLOY_PATH
    assert request.body == {
        "ref": "master",
        "target": "production",
        "task": "deploy",
        "description": "ship it",
        "payload": {"region": "eu", "replicas": "3", "canary": "true"},
    }
    assert stored["jobs"][0]["vela_number"] == vela.deployments[REPO].popitem()[0]


def test_the_echo_becomes_exactly_one_build(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(**DEPLOYMENT_MODE)
    original = str(uuid.uuid4())
    bridge.send("deployment", deployment(77), guid=original)
    bridge.wait_status(original, "success")
    made_by_vela = next(iter(vela.deployments[REPO]))
    echo = str(uuid.uuid4())
    bridge.send("deployment", deployment(made_by_vela), guid=echo)
    bridge.wait_status(echo, "success")
    assert len(posts(vela, DEPLOY_PATH)) == 1
    (build,) = posts(vela, BUILD_PATH)
    assert build.body["event"] == "deployment" and build.body["deploy_number"] == made_by_vela
    assert build.body["deploy"] == "production"


def test_an_early_echo_waits_for_the_request_that_caused_it(
    make_bridge: Any, vela: FakeVela
) -> None:
    bridge = make_bridge(**DEPLOYMENT_MODE)
    vela.script(Reply(create=True, delay=0.5))  # Vela answers after GitHub sent the echo
    made_by_vela = vela.next_deployment_number()
    original, echo = str(uuid.uuid4()), str(uuid.uuid4())
    bridge.send("deployment", deployment(77), guid=original)
    bridge.send("deployment", deployment(made_by_vela), guid=echo)
    bridge.wait_status(echo, "success")
    assert bridge.delivery(original)["status"] == "success"
    assert len(posts(vela, DEPLOY_PATH)) == 1
    assert [p.body["deploy_number"] for p in posts(vela, BUILD_PATH)] == [made_by_vela]


def test_an_unrelated_deployment_is_a_request_again(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(**DEPLOYMENT_MODE)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    bridge.send("deployment", deployment(77), guid=first)
    bridge.send("deployment", deployment(78, environment="staging"), guid=second)
    bridge.wait_status(first, "success")
    bridge.wait_status(second, "success")
    targets = sorted(p.body["target"] for p in posts(vela, DEPLOY_PATH))
    assert targets == ["production", "staging"]
    assert posts(vela, BUILD_PATH) == []


def test_a_restart_between_request_and_echo_changes_nothing(
    make_bridge: Any, vela: FakeVela
) -> None:
    bridge = make_bridge(**DEPLOYMENT_MODE)
    original = str(uuid.uuid4())
    bridge.send("deployment", deployment(77), guid=original)
    bridge.wait_status(original, "success")
    bridge.kill()
    made_by_vela = next(iter(vela.deployments[REPO]))
    vela.deployments.clear()  # only the bridge's own record can tell now
    restarted = make_bridge(**DEPLOYMENT_MODE)
    echo = str(uuid.uuid4())
    restarted.send("deployment", deployment(made_by_vela), guid=echo)
    restarted.wait_status(echo, "success")
    assert len(posts(vela, DEPLOY_PATH)) == 1
    assert [p.body["deploy_number"] for p in posts(vela, BUILD_PATH)] == [made_by_vela]


def test_a_deployment_made_in_vela_is_recognised_by_asking_vela(
    make_bridge: Any, vela: FakeVela
) -> None:
    bridge = make_bridge(**DEPLOYMENT_MODE)
    number = vela.made_in_ui(REPO)
    guid = str(uuid.uuid4())
    bridge.send("deployment", deployment(number), guid=guid)
    bridge.wait_status(guid, "success")
    assert posts(vela, DEPLOY_PATH) == []
    assert [p.body["deploy_number"] for p in posts(vela, BUILD_PATH)] == [number]


def test_a_rejected_deployment_fails_with_velas_message(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(**DEPLOYMENT_MODE)
    vela.script(Reply(400, {"error": "deployment target production not found in pipeline"}))
    guid = str(uuid.uuid4())
    bridge.send("deployment", deployment(77), guid=guid)
    bridge.wait_status(guid, "failure")
    (shown,) = bridge.api("GET", "/api/deliveries", params={"guid": guid}).json()
    assert "target production not found" in shown["error"]
    assert len(vela.posts()) == 1


def test_build_mode_forwards_every_deployment_as_a_build(bridge: Bridge, vela: FakeVela) -> None:
    number = vela.made_in_ui(REPO)
    for deployment_id in (77, number):
        guid = str(uuid.uuid4())
        bridge.send("deployment", deployment(deployment_id), guid=guid)
        bridge.wait_status(guid, "success")
    assert [p.path for p in vela.posts()] == [BUILD_PATH, BUILD_PATH]


def test_a_timed_out_request_is_looked_up_not_sent_again(make_bridge: Any, vela: FakeVela) -> None:
    bridge = make_bridge(
        vela={"timeout_seconds": 0.5}, queue={"lease_seconds": 5}, **DEPLOYMENT_MODE
    )
    vela.script(Reply(create=True, delay=1.5))
    guid = str(uuid.uuid4())
    bridge.send("deployment", deployment(77), guid=guid)
    stored = bridge.wait_status(guid, "success")
    assert len(posts(vela, DEPLOY_PATH)) == 1
    made = next(iter(vela.deployments[REPO]))
    assert stored["jobs"][0]["vela_number"] == made
    # ...and its echo is still recognised as Vela's own.
    echo = str(uuid.uuid4())
    vela.deployments.clear()
    bridge.send("deployment", deployment(made), guid=echo)
    bridge.wait_status(echo, "success")
    assert len(posts(vela, DEPLOY_PATH)) == 1 and len(posts(vela, BUILD_PATH)) == 1
