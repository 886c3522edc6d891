"""The bridge's own cost per delivery, without an HTTP server or a load generator.

    .venv/bin/python bench/inprocess.py                 # 8,000 deliveries, 32 at a time
    .venv/bin/python bench/inprocess.py -n 20000 --repeat 3

Drives the real application (``bridge.app.create_app``, its lifespan, a SQLite queue
in a temp dir, JSON logs to a file) through ASGI calls in this process: the same
signed 8 KB pushes as bench/run.py, ``--concurrency`` in flight, each answered 202
after its group commit and sync. Vela is down (a closed port), as in bench/run.py's
backlog rounds, so forwarding only retries in the background.

It reports CPU time per delivery, of the whole process and of the event loop's
thread, and deliveries per second. With no wrk, uvicorn or fake Vela sharing the
two cores, these figures move less from run to run than bench/run.py's, which makes
this the quicker way to tell whether a change to intake, conversion or the queue
helps; bench/run.py remains the measure of the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from run import SECRET, build_bodies, write_config  # noqa: E402

from bridge.app import create_app  # noqa: E402
from bridge.config import load  # noqa: E402
from bridge.observability import configure_logging  # noqa: E402
from bridge.signature import sign  # noqa: E402

_WARM_UP = 500


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--deliveries", type=int, default=8000)
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh queue")
    args = p.parse_args()
    for _ in range(args.repeat):
        print(asyncio.run(_run(args.deliveries, args.concurrency)))
    return 0


async def _run(count: int, concurrency: int) -> str:
    with tempfile.TemporaryDirectory(prefix="vela-bridge-inprocess-") as tmp:
        work = Path(tmp)
        # Port 9 (discard) is closed on loopback: Vela is down.
        config = load(
            write_config(work / "bridge.toml", 1, "http://127.0.0.1:9", work / "q.db", "info"),
            {},
        )
        with (work / "bridge.log").open("w") as log:
            configure_logging(config.log, stream=log)
            app = create_app(config)
            bodies = build_bodies(64)
            signatures = [sign(b, SECRET.encode()).encode() for b in bodies]
            slots = asyncio.Semaphore(concurrency)

            async def deliver(n: int) -> None:
                async with slots:
                    status = await _post(app, bodies[n % 64], signatures[n % 64], f"d-{n}")
                if status != 202:
                    raise RuntimeError(f"delivery {n} answered {status}")

            async with app.router.lifespan_context(app):
                await asyncio.gather(*(deliver(n) for n in range(_WARM_UP)))
                gc.collect()
                gc.freeze()  # as bridge.cli does before serving
                gc.set_threshold(10_000, 50, 100)
                thread0 = resource.getrusage(resource.RUSAGE_THREAD)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                await asyncio.gather(*(deliver(n) for n in range(_WARM_UP, _WARM_UP + count)))
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                thread1 = resource.getrusage(resource.RUSAGE_THREAD)
    loop_cpu = (thread1.ru_utime - thread0.ru_utime) + (thread1.ru_stime - thread0.ru_stime)
    return (
        f"{count} deliveries, {concurrency} at a time: {count / wall:,.0f}/s;"
        f" CPU {cpu / count * 1e6:.0f} µs per delivery,"
        f" of which the event loop's thread {loop_cpu / count * 1e6:.0f} µs"
    )


async def _post(app: Any, body: bytes, signature: bytes, guid: str) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/webhook",
        "raw_path": b"/webhook",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-github-event", b"push"),
            (b"x-github-delivery", guid.encode()),
            (b"x-hub-signature-256", signature),
        ],
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the answer goes out first
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


if __name__ == "__main__":
    sys.exit(main())
