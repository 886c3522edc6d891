"""Running the real bridge as a process, and talking to it like GitHub does."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from bridge.signature import sign
from tests.fakes.vela import _free_port

SECRET = "it's a secret to everybody"
OTHER_SECRET = "the rotated one"
VELA_TOKEN = "vela-token"
OPERATOR_TOKEN = "operator-token"
PAYLOADS = Path(__file__).parent / "payloads"


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PAYLOADS / name).read_text())
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Bridge:
    """``vela-bridge serve`` in a subprocess, on its own port and SQLite file."""

    def __init__(self, workdir: Path, vela_url: str, **overrides: Mapping[str, Any]) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "queue.db"
        sections: dict[str, dict[str, Any]] = {
            "server": {"port": self.port},
            "github": {"webhook_secrets": [SECRET, OTHER_SECRET]},
            "vela": {"url": vela_url, "token": VELA_TOKEN, "timeout_seconds": 2},
            "queue": {"url": f"sqlite:///{self.db}", "lease_seconds": 10},
            "retry": {"initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.5},
            "log": {"format": "json", "level": "debug"},
            "operator": {"token": OPERATOR_TOKEN},
        }
        for name, table in overrides.items():
            sections.setdefault(name, {}).update(table)
        self.config = write_config(workdir / "config.toml", sections)
        self.log = workdir / "bridge.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.command = [sys.executable, "-m", "bridge"]  # a test may run it another way
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def start(self, wait: bool = True, **popen: Any) -> Bridge:
        env = {
            k: v for k, v in os.environ.items() if k not in ("VELA_TOKEN", "GITHUB_WEBHOOK_SECRET")
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.command, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                **popen,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"bridge exited {self.process.returncode}:\n{self.logs()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"bridge did not start:\n{self.logs()}")

    def kill(self) -> None:
        """kill -9: no shutdown, no cleanup."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.terminate()
        self.client.close()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def send(
        self,
        event: str,
        body: Any,
        *,
        guid: str | None = None,
        secret: str = SECRET,
        form: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POST a delivery signed like GitHub signs it."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        content_type = "application/json"
        if form:
            from urllib.parse import urlencode

            raw = urlencode({"payload": raw.decode()}).encode()
            content_type = "application/x-www-form-urlencoded"
        sent = {
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": guid or str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(raw, secret.encode()),
            "Content-Type": content_type,
            "User-Agent": "GitHub-Hookshot/test",
        }
        sent.update(headers or {})
        return self.client.post("/webhook", content=raw, headers=sent)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the operator API with the operator token."""
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}", **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def delivery(self, guid: str) -> dict[str, Any] | None:
        """The stored delivery and its jobs, read from the queue file (read-only)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute("SELECT * FROM deliveries WHERE guid = ?", (guid,)).fetchone()
            if row is None:
                return None
            d = dict(row)
            d["jobs"] = [
                dict(j)
                for j in conn.execute(
                    "SELECT * FROM jobs WHERE delivery_id = ? ORDER BY number", (row["id"],)
                )
            ]
            return d
        finally:
            conn.close()

    def wait_status(self, guid: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.delivery(guid)
            if last is not None and last["status"] == status:
                return last
            time.sleep(0.05)
        raise AssertionError(f"delivery {guid} is {last and last['status']}, expected {status}")
