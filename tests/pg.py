"""PostgreSQL for the tests: a server named by the environment, or a throwaway cluster.

``VELA_BRIDGE_TEST_POSTGRES_URL`` (a superuser's URL, or one that may CREATE
DATABASE) names a server to use. Without it, when Debian's PostgreSQL is
installed (``apt-get install postgresql``: the binaries are in
/usr/lib/postgresql/<version>/bin), a cluster is made for the session in a
temporary folder (initdb as the ``postgres`` user when running as root, which
initdb refuses), listening on a free loopback port with its socket in that folder
and fsync on, and removed afterwards. Otherwise the PostgreSQL tests are skipped
with the reason shown, except in CI (``CI=true``), where that is a failure.

Every test gets a database of its own (:func:`pg_url`), dropped afterwards. A test
that stops the server takes a cluster of its own (:func:`pg_cluster`, which needs
the binaries even when the environment names a server).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.fakes.vela import _free_port

ENV = "VELA_BRIDGE_TEST_POSTGRES_URL"


class PostgresServer:
    """A server the tests may create databases on."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    def _admin(self, sql: str) -> Any:
        """Run one statement on the admin database; its rows, if it returns any."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description is not None else None

    def wait(self, timeout: float = 30.0) -> None:
        """Until the server answers (a cluster just started takes a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._admin("SELECT 1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = "vb_test_" + uuid.uuid4().hex[:16]
        self._admin(f'CREATE DATABASE "{name}"')
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + name))

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Cluster:
    """``initdb`` + ``pg_ctl start`` in a temporary folder; :meth:`stop` removes it all."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="vela-bridge-pg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.base, "postgres", "postgres")
            self._as = {"user": "postgres", "group": "postgres"}

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.base,
            **self._as,
        )
        if done.returncode != 0:
            log = self.base / "server.log"
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                + (log.read_text(errors="replace") if log.exists() else "")
            )

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-instructions")  # fmt: skip
        self.resume()
        return self.url

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pause(self) -> None:
        """Stop the server (an outage: every connection is cut), keeping its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the server on its data and port; returns once it accepts connections."""
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.base}",
                "-c fsync=on",
                "-c synchronous_commit=on",
                "-c max_connections=200",
                "-c shared_buffers=64MB",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options,
                  "-l", str(self.base / "server.log"), "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def _bindir() -> Path | None:
    """The newest Debian PostgreSQL's binaries, when installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the driver is not installed (pip install -e '.[test]')")
    url = os.environ.get(ENV)
    if url:
        yield PostgresServer(url)
        return
    bindir = _bindir()
    if bindir is None:
        _unavailable(f"set {ENV}, or apt-get install postgresql to start one here")
        return
    cluster = _Cluster(bindir)
    try:
        server = PostgresServer(cluster.start())
        server.wait()
        yield server
    finally:
        cluster.stop()


@pytest.fixture
def pg_cluster() -> Iterator[_Cluster]:
    """A throwaway cluster of this test's own, which it may stop and start (an outage)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the driver is not installed (pip install -e '.[test]')")
    bindir = _bindir()
    if bindir is None:
        _unavailable("an outage needs a cluster of its own: apt-get install postgresql")
        return
    cluster = _Cluster(bindir)
    try:
        PostgresServer(cluster.start()).wait()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A database of this test's own, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
