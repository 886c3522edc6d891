"""The ``vela-bridge`` command: serve, check-config."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from bridge import __version__
from bridge.config import Config, load
from bridge.errors import ConfigError

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

    args = parser.parse_args(argv)
    env = dict(os.environ)
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


def _load(path: Path | None, env: Mapping[str, str]) -> Config:
    if path is None and _DEFAULT_CONFIG.exists():
        path = _DEFAULT_CONFIG
    return load(path, env)


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
        f"queue {config.queue.url}, forwarding to {config.vela.url}",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    # uvicorn reports a failed start-up (the queue could not be opened) by not starting.
    return 0 if server.started else 1
