"""The one fake GitHub API server of the test suite.

A real HTTP server (aiohttp.web) on loopback, in a thread of its own, like the fake
Vela. It speaks the parts of GitHub's REST API the bridge's ``bridge.github`` uses,
checks credentials the way GitHub does, records every request, and can be told to
answer rate limits. Routes live under ``prefix`` ("" like api.github.com, or
"/api/v3" like GitHub Enterprise Server):

    POST /app/installations/{id}/access_tokens         App JWT → installation token
    GET  /app/hook/deliveries                          App JWT; cursor pages + Link
    POST /app/hook/deliveries/{id}/attempts            App JWT; 202, then redelivers
    GET  /repos/{owner}/{repo}/hooks/{hook}/deliveries token mode (github.token)
    POST /repos/{owner}/{repo}/hooks/{hook}/deliveries/{id}/attempts
    GET  /orgs/{org}/hooks/{hook}/deliveries           (and its attempts)
    POST /repos/{owner}/{repo}/statuses/{sha}          installation token or github.token

The App's JWT is verified against the App's public key: RS256, ``iss`` = the app
id, ``iat`` not in the future, ``exp`` at most 10 minutes ahead. A redelivery POSTs
the stored payload, signed with the webhook secret, to ``webhook_url`` (the bridge)
and lists the new attempt with the status the bridge answered (0 when it did not).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.config import GitHubConfig, Secret
from bridge.signature import sign
from tests.fakes.vela import Recorded, _free_port

APP_ID = 4242
TOKEN = "ghp_token-mode-token"
APP_HOOK = "app"


def new_key() -> tuple[str, str]:
    """A fresh throwaway RSA key: (private PEM, public PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@functools.cache
def app_key() -> tuple[str, str]:
    """The test App's key, one per session: (private PEM, public PEM)."""
    return new_key()


def repo_hook(repo: str, hook_id: int) -> str:
    """The fake's name of a repository webhook (token mode)."""
    return f"repos/{repo}/{hook_id}"


def org_hook(org: str, hook_id: int) -> str:
    return f"orgs/{org}/{hook_id}"


@dataclass
class Entry:
    """One attempt in a hook's delivery list (GitHub lists every attempt)."""

    id: int
    guid: str
    event: str
    action: str
    status_code: int
    delivered_at: float
    redelivery: bool
    installation_id: int | None

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "guid": self.guid,
            "delivered_at": datetime.fromtimestamp(self.delivered_at, UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "redelivery": self.redelivery,
            "duration": 0.1,
            "status": "OK" if 200 <= self.status_code < 300 else f"HTTP {self.status_code}",
            "status_code": self.status_code,
            "event": self.event,
            "action": self.action or None,
            "installation_id": self.installation_id,
            "repository_id": 1296269,
            "throttled_at": None,
        }


@dataclass
class Failure:
    """A scripted error answer for the next requests whose path contains ``path``."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    count: int = 1
    path: str = ""


class FakeGitHub:
    def __init__(
        self,
        *,
        public_key: str,
        app_id: int = APP_ID,
        token: str = TOKEN,
        prefix: str = "",
        secret: str = "",
        token_lifetime: float = 3600.0,
    ) -> None:
        self.app_id = app_id
        self.public_key = public_key
        self.token = token
        self.prefix = prefix
        self.secret = secret
        self.token_lifetime = token_lifetime
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        self.webhook_url: str | None = None
        self.redelivery_status = 202  # the listed answer when no webhook_url is set
        self._lock = threading.Lock()
        self._ids = itertools.count(10_000_000)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._clear()

    def _clear(self) -> None:
        self.hooks: dict[str, list[Entry]] = {}
        self.payloads: dict[str, tuple[str, bytes]] = {}  # guid → (event, body)
        self.requests: list[Recorded] = []
        self.redeliveries: list[tuple[str, int, str]] = []  # (hook, delivery id, guid)
        self.statuses: list[dict[str, Any]] = []
        self.tokens: dict[str, tuple[int, float]] = {}  # installation token → (id, expiry)
        self.rejected: list[str] = []  # why credentials were refused
        self.failures: list[Failure] = []

    # -- control, from the test's thread ------------------------------------------------

    def start(self) -> FakeGitHub:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def reset(self) -> None:
        self.wait_idle()
        with self._lock:
            self._clear()
        self.webhook_url = None
        self.redelivery_status = 202

    def add_delivery(
        self,
        payload: dict[str, Any] | bytes,
        *,
        status_code: int,
        event: str = "push",
        guid: str | None = None,
        hook: str = APP_HOOK,
        age: float = 60.0,
        action: str = "",
        installation_id: int | None = None,
        redelivery: bool = False,
    ) -> Entry:
        """List an attempt GitHub made ``age`` seconds ago, answered ``status_code``."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        guid = guid or str(uuid.uuid4())
        with self._lock:
            entry = Entry(
                next(self._ids),
                guid,
                event,
                action,
                status_code,
                time.time() - age,
                redelivery,
                installation_id,
            )
            self.hooks.setdefault(hook, []).append(entry)
            self.payloads[guid] = (event, body)
        return entry

    def fail_next(self, failure: Failure) -> None:
        with self._lock:
            self.failures.append(failure)

    def redelivered(self, hook: str | None = None) -> list[str]:
        """The GUIDs redeliveries were asked for, in order."""
        with self._lock:
            return [g for h, _, g in self.redeliveries if hook is None or h == hook]

    def entries(self, hook: str = APP_HOOK) -> list[Entry]:
        with self._lock:
            return list(self.hooks.get(hook, []))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every redelivery under way has been made."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)

    def wait_for(self, what: Any, timeout: float = 15.0) -> None:
        """Poll ``what()`` until it is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            time.sleep(0.02)
        raise AssertionError(f"fake GitHub: condition not met within {timeout} s")

    # -- the server ----------------------------------------------------------------------

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        app = web.Application(middlewares=[self._middleware])
        p = self.prefix
        app.router.add_post(p + "/app/installations/{id}/access_tokens", self._access_token)
        app.router.add_get(p + "/app/hook/deliveries", self._list)
        app.router.add_post(p + "/app/hook/deliveries/{id}/attempts", self._attempt)
        for scope in ("/repos/{owner}/{repo}", "/orgs/{org}"):
            app.router.add_get(p + scope + "/hooks/{hook}/deliveries", self._list)
            app.router.add_post(p + scope + "/hooks/{hook}/deliveries/{id}/attempts", self._attempt)
        app.router.add_post(p + "/repos/{owner}/{repo}/statuses/{sha}", self._status)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _stop(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        headers = dict(request.headers)
        with self._lock:
            self.requests.append(
                Recorded(
                    request.method, request.path, dict(request.query), headers, body, time.time()
                )
            )
            failure = next((f for f in self.failures if f.path in request.path), None)
            if failure is not None:
                failure.count -= 1
                if failure.count <= 0:
                    self.failures.remove(failure)
        if failure is not None:
            return web.json_response(
                failure.body or {"message": "scripted failure"},
                status=failure.status,
                headers=failure.headers,
            )
        response = await handler(request)
        response.headers.setdefault("X-RateLimit-Limit", "5000")
        response.headers.setdefault("X-RateLimit-Remaining", "4999")
        response.headers.setdefault("X-RateLimit-Reset", str(int(time.time()) + 3600))
        return response

    def _refuse(self, why: str) -> web.Response:
        with self._lock:
            self.rejected.append(why)
        return web.json_response({"message": why}, status=401)

    def _credential(self, request: web.Request) -> tuple[str, str]:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower(), value.strip()

    def _check_jwt(self, request: web.Request) -> str | None:
        """Why the request's App JWT is not acceptable, or None when it is."""
        scheme, value = self._credential(request)
        if scheme != "bearer":
            return "an App JWT (Authorization: Bearer) is required"
        try:
            header = jwt.get_unverified_header(value)
            claims = jwt.decode(
                value,
                self.public_key,
                algorithms=["RS256"],
                issuer=str(self.app_id),
                options={"require": ["iat", "exp", "iss"]},
            )
        except jwt.PyJWTError as exc:
            return f"A JSON web token could not be decoded: {exc}"
        now = time.time()
        if header.get("alg") != "RS256":
            return "the JWT must be signed RS256"
        if not claims["iat"] <= now + 1:
            return "'Issued at' claim ('iat') must be an Integer representing a time in the past"
        if not now < claims["exp"] <= now + 600 + 1:
            return "'Expiration time' claim ('exp') is too far in the future"
        return None

    def _installation_of(self, request: web.Request) -> int | str | None:
        """The installation a token belongs to, None for github.token, or why it is refused."""
        scheme, value = self._credential(request)
        if scheme not in ("token", "bearer"):
            return "a token is required"
        if value == self.token:
            return None
        with self._lock:
            issued = self.tokens.get(value)
        if issued is None:
            return "Bad credentials"
        if issued[1] <= time.time():
            return "the installation token has expired"
        return issued[0]

    async def _access_token(self, request: web.Request) -> web.Response:
        why = self._check_jwt(request)
        if why:
            return self._refuse(why)
        installation = int(request.match_info["id"])
        token = f"ghs_{uuid.uuid4().hex}"
        expires = time.time() + self.token_lifetime
        with self._lock:
            self.tokens[token] = (installation, expires)
        stamp = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response({"token": token, "expires_at": stamp}, status=201)

    def _hook_of(self, request: web.Request) -> tuple[str, web.Response | None]:
        m = request.match_info
        if "hook" not in m:
            why = self._check_jwt(request)
            return APP_HOOK, self._refuse(why) if why else None
        name = (
            repo_hook(f"{m['owner']}/{m['repo']}", int(m["hook"]))
            if "repo" in m
            else (org_hook(m["org"], int(m["hook"])))
        )
        scheme, value = self._credential(request)
        if scheme not in ("token", "bearer") or value != self.token:
            return name, self._refuse("Bad credentials")
        return name, None

    async def _list(self, request: web.Request) -> web.Response:
        hook, refused = self._hook_of(request)
        if refused is not None:
            return refused
        per_page = min(int(request.query.get("per_page", "30")), 100)
        with self._lock:
            entries = sorted(
                self.hooks.get(hook, []), key=lambda e: (e.delivered_at, e.id), reverse=True
            )
        cursor = request.query.get("cursor")
        if cursor:
            after = int(cursor.removeprefix("v1_"))
            index = next(i for i, e in enumerate(entries) if e.id == after)
            entries = entries[index + 1 :]
        page = entries[:per_page]
        headers = {}
        if len(entries) > per_page:
            base = f"http://127.0.0.1:{self.port}{request.path}"
            headers["Link"] = f'<{base}?per_page={per_page}&cursor=v1_{page[-1].id}>; rel="next"'
        return web.json_response([e.json() for e in page], headers=headers)

    async def _attempt(self, request: web.Request) -> web.Response:
        hook, refused = self._hook_of(request)
        if refused is not None:
            return refused
        delivery_id = int(request.match_info["id"])
        with self._lock:
            entry = next((e for e in self.hooks.get(hook, []) if e.id == delivery_id), None)
            if entry is not None:
                self.redeliveries.append((hook, delivery_id, entry.guid))
        if entry is None:
            return web.json_response({"message": "Not Found"}, status=404)
        if entry.delivered_at < time.time() - 3 * 86_400:
            return web.json_response({"message": "Delivery is too old to redeliver"}, status=422)
        if self.webhook_url is None:
            self._record_attempt(hook, entry, self.redelivery_status)
        else:
            task = asyncio.create_task(self._redeliver(hook, entry))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return web.json_response({}, status=202)

    async def _redeliver(self, hook: str, entry: Entry) -> None:
        assert self._session is not None and self.webhook_url is not None
        event, body = self.payloads[entry.guid]
        headers = {
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": entry.guid,
            "X-Hub-Signature-256": sign(body, self.secret.encode()),
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/fake",
        }
        try:
            async with self._session.post(self.webhook_url, data=body, headers=headers) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        self._record_attempt(hook, entry, status)

    def _record_attempt(self, hook: str, entry: Entry, status: int) -> None:
        with self._lock:
            self.hooks[hook].append(
                Entry(
                    next(self._ids),
                    entry.guid,
                    entry.event,
                    entry.action,
                    status,
                    time.time(),
                    True,
                    entry.installation_id,
                )
            )

    async def _status(self, request: web.Request) -> web.Response:
        installation = self._installation_of(request)
        if isinstance(installation, str):
            return self._refuse(installation)
        data = await request.json()
        state, description = data.get("state"), data.get("description", "")
        if state not in ("error", "failure", "pending", "success"):
            return web.json_response({"message": "Validation Failed"}, status=422)
        if len(description) > 140:
            return web.json_response(
                {"message": "Validation Failed", "errors": ["description is too long"]},
                status=422,
            )
        m = request.match_info
        record = {
            "repo": f"{m['owner']}/{m['repo']}",
            "sha": m["sha"],
            "state": state,
            "description": description,
            "target_url": data.get("target_url"),
            "context": data.get("context", "default"),
            "installation": installation,
        }
        with self._lock:
            self.statuses.append(record)
        return web.json_response({"id": len(self.statuses), **record}, status=201)


def app_config(fake: FakeGitHub, **overrides: Any) -> GitHubConfig:
    """A ``GitHubConfig`` in App mode against ``fake``; ``overrides`` replace any key."""
    values: dict[str, Any] = {
        "webhook_secrets": (Secret(fake.secret or "secret"),),
        "api_url": fake.url,
        "app_id": fake.app_id,
        "private_key": Secret(app_key()[0]),
    }
    values.update(overrides)
    return GitHubConfig(**values)
