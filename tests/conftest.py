"""Shared fixtures: the one fake Vela, and bridges started as real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.github import FakeGitHub, app_key
from tests.fakes.vela import FakeVela
from tests.support import SECRET, VELA_TOKEN, Bridge


@pytest.fixture(scope="session")
def fake_vela() -> Iterator[FakeVela]:
    server = FakeVela(token=VELA_TOKEN).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_github() -> Iterator[FakeGitHub]:
    """The one fake GitHub API: App JWTs, installation tokens, hook deliveries, statuses."""
    server = FakeGitHub(public_key=app_key()[1], secret=SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def github(fake_github: FakeGitHub) -> FakeGitHub:
    """The shared fake GitHub with no history and no scripted answers, for one test."""
    fake_github.reset()
    return fake_github


@pytest.fixture
def vela(fake_vela: FakeVela) -> FakeVela:
    """The shared fake Vela, behaving normally and with no history, for one test."""
    fake_vela.reset()
    return fake_vela


@pytest.fixture
def make_bridge(tmp_path: Path, vela: FakeVela) -> Iterator[Callable[..., Bridge]]:
    """Start bridges in this test's folder; every one is stopped afterwards."""
    started: list[Bridge] = []

    def make(start: bool = True, **overrides: Any) -> Bridge:
        bridge = Bridge(tmp_path, vela.url, **overrides)
        started.append(bridge)
        return bridge.start() if start else bridge

    yield make
    for bridge in started:
        bridge.kill() if bridge.process and bridge.process.poll() is None else None
        bridge.client.close()


@pytest.fixture
def bridge(make_bridge: Callable[..., Bridge]) -> Bridge:
    return make_bridge()


@pytest.fixture(scope="module")
def shared_bridge(
    tmp_path_factory: pytest.TempPathFactory, fake_vela: FakeVela
) -> Iterator[Bridge]:
    """One bridge for a module of tests that only need distinct GUIDs."""
    bridge = Bridge(tmp_path_factory.mktemp("bridge"), fake_vela.url).start()
    yield bridge
    bridge.stop()


# -- PostgreSQL (issue 6): a server or a throwaway cluster, and a database per test ----------
from tests.pg import pg_cluster, pg_url, postgres_server  # noqa: E402, F401
