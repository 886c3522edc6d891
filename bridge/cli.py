"""The ``vela-bridge`` command: serve, check-config, deliveries, replay."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.config import Config, load, redact_url
from bridge.errors import BridgeError, ConfigError

_DEFAULT_CONFIG = Path("config.toml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vela-bridge", description="Forward GitHub webhooks to a Vela server, durably."
    )
    parser.add_argument("--version", action="version", version=f"vela-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the bridge")
    serve.add_argument("--config", type=Path, help="TOML file (default: ./config.toml if present)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")

    check = commands.add_parser("check-config", help="validate a configuration and exit")
    check.add_argument("--config", type=Path, help="TOML file (default: ./config.toml if present)")

    for name, text in (("deliveries", "list stored deliveries"), ("replay", "restart a delivery")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--url", help="the bridge (default http://127.0.0.1:8000, or --config's)")
        sub.add_argument("--config", type=Path, help="read server.host/port and operator.token")
        if name == "deliveries":
            sub.add_argument("--repo", help="owner/name: that repository's builds")
            sub.add_argument("--status", help="pending, running, success, failure, killed, skipped")
            sub.add_argument(
                "--event", help="GitHub event, or event.action as listed (without --repo)"
            )
            sub.add_argument("--guid", help="X-GitHub-Delivery (without --repo)")
            sub.add_argument("--page", default="1")
            sub.add_argument("--per-page", default="25")
            sub.add_argument("--json", action="store_true", help="print the build objects")
        else:
            sub.add_argument("repo", help="owner/name")
            sub.add_argument("number", type=int, help="the build number")

    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.command in ("deliveries", "replay"):
        return _operator_command(args, env)
    try:
        config = _load(args.config, env)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.command == "check-config":
        print("configuration is valid")
        return 0
    return _serve(config, args.host, args.port)


def _operator_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from bridge.client import ClientError, OperatorClient, table

    try:
        url, token = _client_settings(args.config, env)
        client = OperatorClient(args.url or url, token)
        if args.command == "replay":
            build = client.replay(args.repo, args.number)
            print(f"{args.repo} #{args.number} restarted: {build.get('status')}")
            return 0
        if args.repo and "/" not in args.repo:
            raise ClientError("--repo must be owner/name")
        query = {"status": args.status, "page": args.page, "per_page": args.per_page}
        if not args.repo:
            query |= {"event": args.event, "guid": args.guid}
        builds = client.deliveries(args.repo, query)
    except ClientError as exc:
        print(f"vela-bridge: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(builds, indent=2) if args.json else table(builds))
    return 0


def _client_settings(path: Path | None, env: Mapping[str, str]) -> tuple[str, str | None]:
    """The bridge's URL and the operator token, read leniently: a client needs no Vela token."""
    from bridge.client import ClientError

    host, port, token = "127.0.0.1", 8000, None
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ClientError(f"{path}: cannot be read ({exc})") from None
        server, operator = raw.get("server", {}), raw.get("operator", {})
        host = str(server.get("host", host))
        port = server.get("port", port)
        if isinstance(port, bool) or not isinstance(port, int):
            raise ClientError(f"{path}: server.port must be a whole number")
        configured = operator.get("token")
        if isinstance(configured, str) and configured.startswith("env:"):
            configured = env.get(configured[4:])
        token = configured if isinstance(configured, str) else None
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}", env.get("BRIDGE_OPERATOR_TOKEN") or token


def _load(path: Path | None, env: Mapping[str, str]) -> Config:
    if path is None and _DEFAULT_CONFIG.exists():
        path = _DEFAULT_CONFIG
    return load(path, env)


class _StartupInOneLine:
    """ASGI: a start-up the bridge refuses for a reason it can name (the queue cannot be
    opened: PostgreSQL is down, the SQLite file is not a database) is logged as that one
    line, where Starlette would hand uvicorn the whole traceback to log. A bug keeps it."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self._app(scope, receive, send)
            return
        failed: list[Any] = []

        async def holding_failure(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed":
                failed.append(message)  # sent below, once the exception is known
            else:
                await send(message)

        try:
            await self._app(scope, receive, holding_failure)
        except BridgeError as exc:
            if not failed:
                raise
            failed[:] = [{"type": "lifespan.startup.failed", "message": f"cannot start: {exc}"}]
        finally:
            for message in failed:
                await send(message)


def _serve(config: Config, host: str | None, port: int | None) -> int:
    import uvicorn

    from bridge.app import create_app
    from bridge.errors import QueueError
    from bridge.observability import configure_logging
    from bridge.queue import preflight

    host = host or config.server.host
    port = config.server.port if port is None else port
    configure_logging(config.log)
    try:
        preflight(config.queue.url)
    except QueueError as exc:
        print(f"vela-bridge: {exc}", file=sys.stderr)
        return 2
    print(
        f"vela-bridge {__version__}: listening on http://{host}:{port}, "
        f"queue {redact_url(config.queue.url)}, forwarding to {redact_url(config.vela.url)}",
        file=sys.stderr,
        flush=True,
    )
    # loop and http stay "auto": uvloop and httptools, dependencies where they install.
    server = uvicorn.Server(
        uvicorn.Config(
            _StartupInOneLine(create_app(config)),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    )
    # Long-lived objects made at import time need no more collecting; collect the young
    # generation less often: full collections were measurable pauses under load (bench/).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    server.run()
    # A failed lifespan start-up (the queue could not be opened) does not return here:
    # uvicorn exits 3 itself. Anything else that kept the server from starting is a 1.
    return 0 if server.started else 1
