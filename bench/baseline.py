"""The baseline: a bare Starlette endpoint under uvicorn, set up as the bridge sets up its own.

    python bench/baseline.py --port N

``POST /webhook`` reads the body and answers 202 with a small JSON body (the size of
the bridge's ``{"status": "queued", "delivery": ...}``); nothing is verified or stored.
The uvicorn settings mirror ``bridge.cli._serve`` so that the ratio bridge/baseline
measures what the bridge itself costs, not a difference of server set-up.
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_MAX_BODY = 26_214_400  # the bridge's default server.max_body_bytes
_ANSWER = b'{"status":"queued","delivery":"00000000-0000-0000-0000-000000000000"}'


async def webhook(request: Request) -> Response:
    await request.body()
    return Response(_ANSWER, status_code=202, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(
    routes=[
        Route("/webhook", webhook, methods=["POST"], max_body_size=_MAX_BODY),
        Route("/healthz", healthz),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Same arguments as bridge.cli._serve (one worker, loop/http "auto").
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    )
    server.run()


if __name__ == "__main__":
    main()
