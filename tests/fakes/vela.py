"""The one fake Vela server of the test suite (and the benchmark).

A real HTTP server (aiohttp.web) on loopback, in a thread of its own, that
speaks the parts of Vela's API the bridge uses, records every request, and can
be told to misbehave: refuse connections, answer a given status, or hang.
Like Vela, it answers 401 to every request without ``Bearer <token>``.

    GET  /api/v1/user                          200 + the token's user
    POST /api/v1/repos/{org}/{repo}/builds     201 + build object (number per repo, link)
    GET  /api/v1/repos/{org}/{repo}/builds     ?commit=&event=: the builds it created
    POST /api/v1/deployments/{org}/{repo}      201 + deployment (number it "created" on GitHub)
    GET  /api/v1/deployments/{org}/{repo}/{id} 200 when it made or was told of that number
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_CREATED = web.RequestKey("created", "Reply")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class Reply:
    """A scripted answer: ``status`` with ``body`` (JSON), after ``delay`` seconds.

    With ``create``, the request is handled as Vela would (the build exists) and only
    the answer is delayed: a client that times out cannot know it succeeded. With
    ``create`` and a ``status`` other than 201, that status and ``body`` are answered
    instead of the build, as a gateway in front of Vela may after passing it on.
    """

    status: int = 201
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    create: bool = False


class FakeVela:
    def __init__(self, token: str = "vela-token") -> None:
        self.token = token  # a test may change it (the bridge's token "expires"): reset() undoes
        self._own_token = token
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._default: dict[str | None, Reply] = {}
        self.requests: list[Recorded] = []
        self.builds: dict[str, list[dict[str, Any]]] = {}
        self.deployments: dict[str, dict[int, dict[str, Any]]] = {}
        self._next_deployment = 1000
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- control, from the test's thread ------------------------------------------------

    def start(self) -> FakeVela:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._runner.cleanup() if self._runner else _nothing())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def go_down(self) -> None:
        """Close the listening socket and every connection: connections are refused."""
        self._call(self._runner.cleanup() if self._runner else _nothing())
        self._runner = None

    def come_up(self) -> None:
        self._call(self._start())

    def reset(self) -> None:
        self.token = self._own_token
        with self._lock:
            self._script.clear()
            self._default.clear()
            self.requests.clear()
            self.builds.clear()
            self.deployments.clear()
        if self._runner is None:
            self.come_up()

    def script(self, *replies: Reply) -> None:
        """The next POSTs that pass the token check get these answers, in order; then the
        default behaviour."""
        with self._lock:
            self._script.extend(replies)

    def always(self, reply: Reply | None, repo: str | None = None) -> None:
        """Every POST (for ``repo`` "org/name" only, if given) gets this answer; None: undo."""
        with self._lock:
            if reply is None:
                self._default.pop(repo, None)
            else:
                self._default[repo] = reply

    def posts(self, prefix: str = "/api/v1/") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.startswith(prefix)]

    def wait_for_posts(self, count: int, timeout: float = 15.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            posts = self.posts()
            if len(posts) >= count:
                return posts
            time.sleep(0.02)
        raise AssertionError(f"fake Vela got {len(self.posts())} POSTs, expected {count}")

    # -- the server ----------------------------------------------------------------------

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._authenticate])
        app.router.add_get("/api/v1/user", self._current_user)
        app.router.add_post("/api/v1/repos/{org}/{repo}/builds", self._create_build)
        app.router.add_get("/api/v1/repos/{org}/{repo}/builds", self._list_builds)
        app.router.add_post("/api/v1/deployments/{org}/{repo}", self._create_deployment)
        app.router.add_get("/api/v1/deployments/{org}/{repo}", self._list_deployments)
        app.router.add_get("/api/v1/deployments/{org}/{repo}/{id}", self._get_deployment)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _record(self, request: web.Request) -> Recorded:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        item = Recorded(
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            body,
            time.time(),
        )
        with self._lock:
            self.requests.append(item)
        return item

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Vela authenticates every API request before anything else."""
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            await self._record(request)
            return web.json_response({"error": "unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _current_user(self, request: web.Request) -> web.Response:
        """api-spec.json GetCurrentUser: the user the token belongs to."""
        await self._record(request)
        return web.json_response({"id": 1, "name": "vela-bridge", "active": True, "admin": False})

    def _next_reply(self, repo: str) -> Reply | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
            return self._default.get(repo) or self._default.get(None)

    async def _scripted(self, request: web.Request) -> web.Response | None:
        reply = self._next_reply(f"{request.match_info['org']}/{request.match_info['repo']}")
        if reply is None:
            return None
        if reply.create:
            request[_CREATED] = reply
            return None
        await self._record(request)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    async def _create_build(self, request: web.Request) -> web.Response:
        scripted = await self._scripted(request)
        if scripted is not None:
            return scripted
        item = await self._record(request)
        org, repo = request.match_info["org"], request.match_info["repo"]
        with self._lock:
            builds = self.builds.setdefault(f"{org}/{repo}", [])
            build = {
                **item.body,
                "id": len(builds) + 1,
                "number": len(builds) + 1,
                "status": "pending",
                "link": f"{self.url}/{org}/{repo}/{len(builds) + 1}",
                "created": int(time.time()),
            }
            builds.append(build)
        return await self._answer(request, build)

    async def _answer(self, request: web.Request, created: dict[str, Any]) -> web.Response:
        """201 with what was created, or the scripted answer instead, after a scripted
        delay when one was asked for."""
        reply = request.get(_CREATED)
        if reply is None:
            return web.json_response(created, status=201)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status == 201:
            return web.json_response(created, status=201)
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    async def _list_builds(self, request: web.Request) -> web.Response:
        await self._record(request)
        org, repo = request.match_info["org"], request.match_info["repo"]
        query = request.query
        with self._lock:
            found = [
                b
                for b in self.builds.get(f"{org}/{repo}", [])
                if all(b.get(k) == query[k] for k in ("commit", "event") if k in query)
            ]
        return web.json_response(list(reversed(found)))

    async def _create_deployment(self, request: web.Request) -> web.Response:
        scripted = await self._scripted(request)
        if scripted is not None:
            return scripted
        item = await self._record(request)
        key = f"{request.match_info['org']}/{request.match_info['repo']}"
        with self._lock:
            self._next_deployment += 1
            number = self._next_deployment
            deployment = {
                **item.body,
                "id": number,
                "number": number,
                "created_at": int(time.time()),
            }
            self.deployments.setdefault(key, {})[number] = deployment
        return await self._answer(request, deployment)

    def made_in_ui(self, repo: str, target: str = "production") -> int:
        """A deployment created in Vela's UI or CLI: Vela knows its number, the bridge doesn't."""
        with self._lock:
            self._next_deployment += 1
            number = self._next_deployment
            self.deployments.setdefault(repo, {})[number] = {
                "id": number,
                "number": number,
                "target": target,
            }
        return number

    def next_deployment_number(self) -> int:
        with self._lock:
            return self._next_deployment + 1

    async def _list_deployments(self, request: web.Request) -> web.Response:
        await self._record(request)
        key = f"{request.match_info['org']}/{request.match_info['repo']}"
        with self._lock:
            found = list(self.deployments.get(key, {}).values())
        return web.json_response(found[::-1])

    async def _get_deployment(self, request: web.Request) -> web.Response:
        await self._record(request)
        key = f"{request.match_info['org']}/{request.match_info['repo']}"
        with self._lock:
            found = self.deployments.get(key, {}).get(int(request.match_info["id"]))
        if found is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(found)


async def _nothing() -> None:
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
