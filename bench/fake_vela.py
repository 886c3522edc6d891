"""A minimal, fast fake Vela for the benchmark, run in a process of its own.

    python bench/fake_vela.py --port N

    POST /api/v1/repos/{org}/{repo}/builds       201 {"number": n, "link": ...}
    POST /api/v1/deployments/{org}/{repo}        201 {"id": n, "number": n}
    GET  /api/v1/repos/{org}/{repo}/builds       200 [] (look-up after an unclear attempt)
    GET  /_stats                                 counters (below), as JSON
    GET  /healthz                                200

``/_stats``: ``posts`` (POSTs received), ``unique`` (distinct ``X-GitHub-Delivery``
values), ``duplicates`` (GUIDs received more than once), ``missing_guid`` (POSTs
without the header), ``unauthorized`` (POSTs with a wrong token; still answered 201).

Unlike tests/fakes/vela.py it records nothing but the GUIDs, so that it is not the
bottleneck of a drain measurement, and it does not share the load generator's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

_BUILD = b'{"number": %d, "link": "http://vela.invalid/build/%d", "status": "pending"}'


class Counts:
    def __init__(self, token: str) -> None:
        self.auth = f"Bearer {token}"
        self.seen: dict[str, int] = {}
        self.posts = 0
        self.duplicates = 0
        self.missing_guid = 0
        self.unauthorized = 0

    def record(self, request: web.Request) -> int:
        self.posts += 1
        if request.headers.get("Authorization") != self.auth:
            self.unauthorized += 1
        guid = request.headers.get("X-GitHub-Delivery")
        if guid is None:
            self.missing_guid += 1
            return self.posts
        seen = self.seen.get(guid, 0)
        if seen == 1:
            self.duplicates += 1
        self.seen[guid] = seen + 1
        return self.posts

    def stats(self) -> dict[str, int]:
        return {
            "posts": self.posts,
            "unique": len(self.seen),
            "duplicates": self.duplicates,
            "missing_guid": self.missing_guid,
            "unauthorized": self.unauthorized,
        }


def make_app(token: str) -> web.Application:
    counts = Counts(token)

    async def create(request: web.Request) -> web.Response:
        await request.read()
        n = counts.record(request)
        return web.Response(status=201, body=_BUILD % (n, n), content_type="application/json")

    async def deployment(request: web.Request) -> web.Response:
        await request.read()
        n = counts.record(request)
        body = json.dumps({"id": n, "number": n}).encode()
        return web.Response(status=201, body=body, content_type="application/json")

    async def list_builds(request: web.Request) -> web.Response:
        return web.Response(status=200, body=b"[]", content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts.stats())

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/api/v1/repos/{org}/{repo}/builds", create)
    app.router.add_get("/api/v1/repos/{org}/{repo}/builds", list_builds)
    app.router.add_post("/api/v1/deployments/{org}/{repo}", deployment)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="vela-token")
    args = parser.parse_args()
    try:  # optional: faster when present, never required
        import uvloop  # type: ignore[import-not-found]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(
        make_app(args.token),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=0.1,
        handle_signals=True,
    )


if __name__ == "__main__":
    main()
