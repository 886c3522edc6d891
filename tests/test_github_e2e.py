"""Talking back to GitHub end to end: the real bridge process, the fake Vela, the fake GitHub.

The fake GitHub serves the API under ``/api/v3`` (GitHub Enterprise Server's layout),
verifies the App's JWTs and installation tokens, and redelivers by POSTing the
stored, signed payload to the bridge's ``/webhook``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fakes.github import APP_ID, FakeGitHub, app_key
from tests.fakes.vela import FakeVela, Reply
from tests.support import OPERATOR_TOKEN, SECRET, VELA_TOKEN, Bridge, payload, write_config

PUSH = payload("hand.push.feature-branch.json")


def app_section(tmp_path: Path, fake: FakeGitHub, **keys: Any) -> dict[str, Any]:
    """The [github] keys of App mode against ``fake`` (webhook_secrets come from Bridge)."""
    key_file = tmp_path / "app.pem"
    key_file.write_text(app_key()[0])
    return {"api_url": fake.url, "app_id": APP_ID, "private_key_file": str(key_file), **keys}


def push(installation: int = 7) -> dict[str, Any]:
    body = copy.deepcopy(PUSH)
    body["head_commit"]["id"] = uuid.uuid4().hex + "00000000"
    body["installation"] = {"id": installation}
    return body


def wait_wired(bridge: Bridge, timeout: float = 5.0) -> None:
    """Fail fast when the lifespan does not start bridge.github (its start-up line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "talking back to GitHub" in bridge.logs():
            return
        time.sleep(0.05)
    raise AssertionError("the bridge did not start talking back to GitHub")


def test_deliveries_lost_while_the_bridge_was_down_are_redelivered_and_forwarded_once(
    make_bridge: Callable[..., Bridge], vela: FakeVela, github: FakeGitHub, tmp_path: Path
) -> None:
    lost = [
        github.add_delivery(push(), status_code=0, age=3600),  # the bridge was down
        github.add_delivery(push(), status_code=502, age=1800),  # its proxy said so
        github.add_delivery(push(), status_code=0, age=600),
    ]
    github.add_delivery(push(), status_code=401, age=300)  # refused on purpose: never asked
    bridge = make_bridge(
        start=False,
        github=app_section(tmp_path, github, redeliver=True, redeliver_interval_seconds=0.5),
    )
    github.webhook_url = f"{bridge.url}/webhook"
    bridge.start()
    wait_wired(bridge)

    for entry in lost:
        bridge.wait_status(entry.guid, "success")
    time.sleep(2.0)  # a few more sweeps: nothing is asked for twice
    github.wait_idle()

    assert sorted(github.redelivered()) == sorted(e.guid for e in lost)
    forwarded = Counter(p.headers["X-GitHub-Delivery"] for p in vela.posts())
    assert forwarded == Counter({e.guid: 1 for e in lost})
    assert github.rejected == []
    assert "github sweep ok" in bridge.logs()
    metrics = bridge.client.get("/metrics").text
    assert "vela_bridge_github_redeliveries_requested_total 3.0" in metrics
    assert 'vela_bridge_github_sweeps_total{result="ok"}' in metrics


def test_a_permanent_vela_error_sets_one_error_status_and_a_restart_a_success(
    make_bridge: Callable[..., Bridge], vela: FakeVela, github: FakeGitHub, tmp_path: Path
) -> None:
    vela.always(Reply(422, {"error": "unable to compile pipeline"}))
    bridge = make_bridge(github=app_section(tmp_path, github, report_failures=True))
    wait_wired(bridge)
    body, guid = push(installation=7), str(uuid.uuid4())
    sha = body["head_commit"]["id"]

    assert bridge.send("push", body, guid=guid).status_code == 202
    failed = bridge.wait_status(guid, "failure")
    github.wait_for(lambda: github.statuses)
    time.sleep(0.5)  # nothing more comes
    (status,) = github.statuses
    assert status["repo"] == "octo-org/web.app" and status["sha"] == sha
    assert (status["state"], status["context"], status["target_url"]) == (
        "error",
        "vela-bridge",
        None,
    )
    assert "unable to compile pipeline" in status["description"]
    assert len(status["description"]) <= 140
    assert status["installation"] == 7

    vela.always(None)  # fixed; an operator restarts the delivery
    restarted = bridge.api("POST", f"/api/repos/octo-org/web.app/builds/{failed['number']}")
    assert restarted.status_code == 200
    bridge.wait_status(guid, "success")
    github.wait_for(lambda: len(github.statuses) == 2)
    link = vela.builds["octo-org/web.app"][-1]["link"]
    assert (github.statuses[1]["state"], github.statuses[1]["target_url"]) == ("success", link)
    assert github.rejected == []


def test_check_config_reports_unusable_github_credentials(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.toml",
        {
            "github": {
                "webhook_secrets": [SECRET],
                "app_id": APP_ID,
                "private_key_file": str(tmp_path / "missing.pem"),
                "report_failures": True,
            },
            "vela": {"token": VELA_TOKEN},
            "operator": {"token": OPERATOR_TOKEN},
        },
    )
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "github.private_key_file: cannot be read (No such file or directory)" in (
        done.stdout + done.stderr
    )
