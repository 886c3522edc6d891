"""The vela-bridge benchmark: intake, acknowledgement latency, drain, backlog, memory.

    .venv/bin/python bench/run.py            # full run, under ~3 minutes
    .venv/bin/python bench/run.py --quick    # one short round of each, for a fast check
    .venv/bin/python bench/run.py --queue postgres   # the same on PostgreSQL

Everything runs on loopback, in processes of its own: a fast fake Vela
(bench/fake_vela.py), the bridge (``python -m bridge serve`` with a generated TOML,
SQLite queue in a temp dir, or with ``--queue postgres`` a database of its own on
a throwaway PostgreSQL cluster or on ``--queue-url``), a bare Starlette endpoint
under the same uvicorn settings (bench/baseline.py), and wrk with bench/webhook.lua
as the load.
Results go to bench/results/latest.json and a short table; bench/README.md says
what each figure means. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bridge.signature import sign  # noqa: E402

SECRET = "bench-webhook-secret"  # noqa: S105 (loopback only)
VELA_TOKEN = "bench-vela-token"  # noqa: S105
PAYLOAD = REPO / "tests" / "payloads" / "hand.push.feature-branch.json"
LUA = BENCH / "webhook.lua"
BODY_BYTES = 8192
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# name, how the figure is compared, the target; shown next to the figures.
TARGETS: list[tuple[str, str, float, str]] = [
    ("intake_ratio", ">=", 0.5, "bridge accepted/s ≥ 0.5 × bare Starlette"),
    ("bridge_p99_ms", "<=", 20.0, "p99 acknowledgement ≤ 20 ms at 32 connections"),
    ("drain_after_load_per_s", ">=", 1500.0, "drain after a load round ≥ 1,500/s"),
    ("drain_standing_per_s", ">=", 1500.0, "drain of a standing backlog ≥ 1,500/s"),
    ("backlog_ratio", ">=", 0.9, "intake with the backlog queued ≥ 0.9 × empty queue"),
    ("rss_peak_mb", "<=", 200.0, "bridge peak RSS ≤ 200 MB"),
    ("duplicates", "<=", 0, "GUIDs Vela received more than once: 0"),
    ("non_2xx", "<=", 0, "non-2xx answers and socket errors: 0"),
]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    if args.profile and _py_spy() is None:
        print("--profile needs py-spy (pip install py-spy into the venv)", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bench.cleanup()
    report = bench.report()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    print(f"\nwritten: {out}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="vela-bridge benchmark (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="1 round of each, 3 s, smaller backlog")
    p.add_argument("--rounds", type=int, help="load rounds per server (default 3, quick 1)")
    p.add_argument("--duration", type=int, help="seconds per load round (default 5, quick 3)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--lanes", type=int, default=64, help="distinct refs (ordering lanes)")
    p.add_argument("--backlog", type=int, help="deliveries queued for the backlog rounds")
    p.add_argument("--standing", type=int, help="deliveries queued for the standing drain")
    p.add_argument("--log-level", default="info", help="the bridge's log.level (default info)")
    p.add_argument(
        "--python",
        default=sys.executable,
        type=os.path.abspath,  # not resolved: a venv's python is a symlink to its base
        help="interpreter for the bridge and the baseline",
    )
    p.add_argument("--skip-backlog", action="store_true", help="no 100k-backlog rounds")
    p.add_argument(
        "--profile", action="store_true", help="py-spy the bridge (raw stacks in bench/results/)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, queue files)")
    p.add_argument(
        "--queue",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the bridge's queue: SQLite files (default) or PostgreSQL",
    )
    p.add_argument(
        "--queue-url",
        help="with --queue postgres: an existing server (a URL that may CREATE DATABASE);"
        " default: a throwaway cluster on loopback",
    )
    p.add_argument(
        "--out", help="JSON output (default bench/results/latest.json, latest-postgres.json)"
    )
    args = p.parse_args(argv)
    if args.queue_url and args.queue != "postgres":
        p.error("--queue-url needs --queue postgres")
    if args.out is None:
        name = "latest.json" if args.queue == "sqlite" else "latest-postgres.json"
        args.out = str(BENCH / "results" / name)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3 if args.quick else 5)
    args.backlog = args.backlog if args.backlog is not None else (20_000 if args.quick else 100_000)
    args.standing = (
        args.standing if args.standing is not None else (5_000 if args.quick else 20_000)
    )
    return args


# -- payloads ---------------------------------------------------------------------------------


def build_bodies(lanes: int) -> list[bytes]:
    """``lanes`` ~8 KB push payloads, one ref (ordering lane) each, padded with commits."""
    base = json.loads(PAYLOAD.read_text())
    commit = base["commits"][0]

    def render(ref: str, extra: int) -> bytes:
        payload = dict(base, ref=ref)
        padding = [
            dict(commit, id=f"{i + 1:040x}", message=f"bench padding commit {i}")
            for i in range(extra)
        ]
        payload["commits"] = [*padding, commit]
        return json.dumps(payload, separators=(",", ":")).encode()

    extra = 0
    while len(render("refs/heads/bench/lane-00", extra + 1)) <= BODY_BYTES:
        extra += 1
    return [render(f"refs/heads/bench/lane-{i:02d}", extra) for i in range(lanes)]


def write_bodies(directory: Path, bodies: list[bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, body in enumerate(bodies):
        (directory / f"body-{i:02d}.json").write_bytes(body)
    sigs = "".join(sign(body, SECRET.encode()) + "\n" for body in bodies)
    (directory / "signatures.txt").write_text(sigs)
    return directory


# -- processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VELA_TOKEN", "GITHUB_WEBHOOK_SECRET", "BRIDGE_OPERATOR_TOKEN")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Service:
    """A server process this benchmark started (and alone stops, by its PID)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, port: int) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self) -> Service:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=self.workdir
            )
        return self

    def start(self, ready_path: str = "/healthz", timeout: float = 30.0) -> Service:
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if http_get(self.url + ready_path, timeout=1.0)[0] == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start in {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def memory_mb(self) -> dict[str, float]:
        """VmHWM (peak RSS) and VmRSS from /proc, in MB (MiB)."""
        out: dict[str, float] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
        return out

    def disk_written(self) -> int:
        """Bytes this process caused to be written to storage (/proc/<pid>/io write_bytes)."""
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all threads) so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def main_thread_cpu_seconds(self) -> float:
        """User + system CPU time of the main thread (the event loop) alone."""
        stat = Path(f"/proc/{self.pid}/task/{self.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
        return response.status, response.read()


class Vela(Service):
    def stats(self) -> dict[str, int]:
        data: dict[str, int] = json.loads(http_get(self.url + "/_stats")[1])
        return data


class QueueFile:
    """Read-only look at a bridge's SQLite queue: how many jobs exist, how many are active."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        return self._conn

    def jobs(self) -> int:
        row = self._db().execute("SELECT MAX(id) FROM jobs").fetchone()
        return int(row[0] or 0)

    def active(self) -> int:
        row = (
            self._db()
            .execute("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running', 'retrying')")
            .fetchone()
        )
        return int(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresQueueDb:
    """The same look at a bridge's PostgreSQL queue (one database per bridge), via psycopg."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None

    def _one(self, sql: str) -> int:
        import psycopg

        if self._conn is None:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        row = self._conn.execute(sql).fetchone()
        return int(row[0] or 0)

    def jobs(self) -> int:
        # count(*), not MAX(id): identity values are not reused after a rolled-back batch.
        return self._one("SELECT count(*) FROM jobs")

    def active(self) -> int:
        return self._one(
            "SELECT count(*) FROM jobs WHERE state IN ('pending', 'running', 'retrying')"
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Postgres:
    """The server the PostgreSQL runs use: a throwaway cluster (tests/pg.py) or ``--queue-url``.

    Each bridge gets a database of its own, so no phase sees another's rows. The cluster is
    stopped and its folder removed by :meth:`close`; on a server named by URL, the databases
    this run created are dropped instead.
    """

    def __init__(self, url: str | None) -> None:
        from tests.pg import PostgresServer, _bindir, _Cluster

        self.cluster: Any = None
        self.created: list[str] = []
        if url is None:
            bindir = _bindir()
            if bindir is None:
                raise RuntimeError(
                    "no PostgreSQL binaries (apt-get install postgresql), or pass --queue-url"
                )
            self.cluster = _Cluster(bindir)
        try:
            self.admin_url = url if url is not None else self.cluster.start()
            self.server = PostgresServer(self.admin_url)
            self.server.wait()
        except BaseException:
            if self.cluster is not None:
                self.cluster.stop()  # removes the folder too
            raise

    def _admin(self, sql: str) -> Any:
        return self.server._admin(sql)

    def create_database(self, name: str) -> str:
        db = f"vb_bench_{name}_{uuid.uuid4().hex[:8]}".replace("-", "_")
        self._admin(f'CREATE DATABASE "{db}"')
        self.created.append(db)
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + db))

    def database_mb(self, url: str) -> float:
        db = urlsplit(url).path.lstrip("/")
        rows = self._admin(f"SELECT pg_database_size('{db}')")
        return round(int(rows[0][0]) / 2**20, 1)

    def info(self) -> dict[str, Any]:
        rows = self._admin(
            "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', 'fsync',"
            " 'synchronous_commit', 'shared_buffers', 'wal_level', 'max_connections')"
        )
        out: dict[str, Any] = dict(rows)
        out["throwaway_cluster"] = self.cluster is not None
        return out

    def server_pids(self) -> list[int]:
        """The postmaster and its children (throwaway cluster only; [] otherwise)."""
        if self.cluster is None:
            return []
        try:
            main = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        pids = [main]
        with contextlib.suppress(OSError):
            pids += [int(x) for x in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
        return pids

    def usage(self) -> tuple[float, int]:
        """CPU seconds and write_bytes of the cluster so far (reaped backends' CPU included
        through the postmaster's cutime/cstime; their write_bytes are not)."""
        cpu, disk = 0.0, 0
        pids = self.server_pids()
        for i, pid in enumerate(pids):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                ticks = int(fields[11]) + int(fields[12])
                if i == 0:
                    ticks += int(fields[13]) + int(fields[14])
                cpu += ticks / _CLK_TCK
                for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                    if line.startswith("write_bytes:"):
                        disk += int(line.split()[1])
        return cpu, disk

    def close(self, keep_log: Path | None = None) -> None:
        if self.cluster is not None:
            if keep_log is not None:
                with contextlib.suppress(OSError):
                    shutil.copy(self.cluster.base / "server.log", keep_log)
            self.cluster.stop()  # pg_ctl stop -m fast, then the folder is removed
            self.cluster = None
            return
        for db in self.created:
            with contextlib.suppress(Exception):
                self._admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        self.created = []


def write_config(path: Path, port: int, vela_url: str, db: Path | str, log_level: str) -> Path:
    """``db``: the SQLite file, or a ``postgresql://`` URL."""
    queue_url = db if isinstance(db, str) else "sqlite:///" + str(db)
    path.write_text(
        "[server]\n"
        f'host = "127.0.0.1"\nport = {port}\n\n'
        "[github]\n"
        f"webhook_secrets = [{json.dumps(SECRET)}]\n\n"
        "[vela]\n"
        f"url = {json.dumps(vela_url)}\ntoken = {json.dumps(VELA_TOKEN)}\n\n"
        "[queue]\n"
        f"url = {json.dumps(queue_url)}\n\n"
        "[log]\n"
        f'level = {json.dumps(log_level)}\nformat = "json"\n'
    )
    return path


# -- pre-filling a queue through the bridge's own queue API ---------------------------------------


async def _prefill(db: Path | str, bodies: list[bytes], count: int, tag: str) -> None:
    from bridge.convert import Policy, convert
    from bridge.intake import _delivery  # what intake stores, built the way intake builds it
    from bridge.queue import open_queue

    url = db if isinstance(db, str) else f"sqlite:///{db}"
    queue = await open_queue(url, lease_seconds=60, retention_days=14)
    conversions = [convert("push", json.loads(body), Policy()) for body in bodies]
    try:
        chunk = 2048
        for start in range(0, count, chunk):
            now = time.time()
            await asyncio.gather(
                *(
                    queue.add(
                        _delivery(
                            f"{tag}-{i}",
                            "push",
                            conversions[i % len(bodies)],
                            bodies[i % len(bodies)],
                            now,
                        )
                    )
                    for i in range(start, min(count, start + chunk))
                )
            )
    finally:
        await queue.close()


def prefill(db: Path | str, bodies: list[bytes], count: int, tag: str) -> float:
    started = time.monotonic()
    asyncio.run(_prefill(db, bodies, count, tag))
    return time.monotonic() - started


# -- the benchmark ------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.workdir = Path(tempfile.mkdtemp(prefix="vela-bridge-bench-"))
        self.services: list[Service] = []
        self.rounds: dict[str, list[dict[str, Any]]] = {
            "baseline": [],
            "bridge": [],
            "backlog_empty": [],
            "backlog_full": [],
        }
        self.extra: dict[str, Any] = {}
        self.bodies = build_bodies(args.lanes)
        self.data = write_bodies(self.workdir / "bodies", self.bodies)
        self.results_dir = Path(args.out).parent
        self._round_no = 0
        self.pg: Postgres | None = None  # --queue postgres: the server, set up by run()

    # -- plumbing

    def _service(self, name: str, argv: list[str], port: int, cls: type[Service] = Service) -> Any:
        service = cls(name, argv, self.workdir, port)
        self.services.append(service)
        return service

    def _queue_for(self, name: str) -> tuple[Path | str, QueueFile | PostgresQueueDb]:
        """A fresh queue for one bridge: a SQLite file in its own folder, or a new database."""
        if self.pg is not None:
            url = self.pg.create_database(name)
            return url, PostgresQueueDb(url)
        db = self.workdir / name / "queue.db"
        db.parent.mkdir()
        return db, QueueFile(db)

    def _bridge(self, name: str, vela_url: str, db: Path | str) -> Service:
        port = _free_port()
        config = write_config(
            self.workdir / f"{name}.toml", port, vela_url, db, self.args.log_level
        )
        argv = [self.args.python, "-m", "bridge", "serve", "--config", str(config)]
        return self._service(name, argv, port)

    def cleanup(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop()
        if self.pg is not None:
            keep_log = self.workdir / "postgres.log" if self.args.keep else None
            try:
                self.pg.close(keep_log)
            except Exception as exc:
                print(f"PostgreSQL cleanup failed: {exc}", file=sys.stderr)
            self.pg = None
        if self.args.keep:
            print(f"kept: {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def wrk(self, target: Service, duration: float, label: str) -> dict[str, Any]:
        self._round_no += 1
        prefix = f"{self.run_id}-{label}{self._round_no}"
        a = self.args
        cmd = [
            "wrk",
            f"-t{a.threads}",
            f"-c{a.connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            target.url,
            "--",
            str(self.data),
            prefix,
        ]
        cpu0, disk0 = target.cpu_seconds(), target.disk_written()
        main0 = target.main_thread_cpu_seconds()
        db0 = self.pg.usage() if self.pg is not None else None
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        cpu = target.cpu_seconds() - cpu0
        main_cpu = target.main_thread_cpu_seconds() - main0
        disk = target.disk_written() - disk0
        db1 = self.pg.usage() if self.pg is not None else None
        for line in done.stdout.splitlines():
            if line.startswith("BENCH_RESULT "):
                result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
                break
        else:
            raise RuntimeError(f"wrk said:\n{done.stdout}\n{done.stderr}")
        seconds = result["duration_us"] / 1e6
        lat = result["latency_us"]
        errors = result["errors"]
        extra: dict[str, Any] = {}
        if db0 is not None and db1 is not None and self.pg is not None and self.pg.cluster:
            # The throwaway cluster's own work, for this round (and any forwarding in it).
            n = max(1, result["requests"])
            extra = {
                "db_server_cpu_s": round(db1[0] - db0[0], 2),
                "db_server_cpu_us_per_request": round((db1[0] - db0[0]) / n * 1e6, 1),
                "db_server_disk_kb_per_request": round((db1[1] - db0[1]) / n / 1024, 1),
            }
        return {
            "prefix": prefix,
            "seconds": round(seconds, 3),
            "requests": result["requests"],
            "accepted": result["accepted"],
            "accepted_per_s": round(result["accepted"] / seconds, 1),
            "other_2xx": result["ok_other"],
            "non_2xx": result["non2xx"],
            "socket_errors": errors["connect"]
            + errors["read"]
            + errors["write"]
            + errors["timeout"],
            "p50_ms": lat["p50"] / 1000,
            "p90_ms": lat["p90"] / 1000,
            "p99_ms": lat["p99"] / 1000,
            "p999_ms": lat["p999"] / 1000,
            "max_ms": lat["max"] / 1000,
            "mean_ms": round(lat["mean"] / 1000, 3),
            "server_cpu_s": round(cpu, 2),
            "server_cpu_us_per_request": round(cpu / max(1, result["requests"]) * 1e6, 1),
            "server_main_thread_cpu_us_per_request": round(
                main_cpu / max(1, result["requests"]) * 1e6, 1
            ),
            "server_disk_kb_per_request": round(disk / max(1, result["requests"]) / 1024, 1),
            **extra,
        }

    def wait_drained(
        self,
        vela: Vela,
        queue: QueueFile | PostgresQueueDb,
        offset: int,
        timeout: float = 180.0,
    ) -> tuple[float, int, int]:
        """Seconds until the fake Vela has every job of ``queue``; the jobs and unique GUIDs."""
        started = time.monotonic()
        while True:
            forwarded = vela.stats()["unique"] - offset
            active = queue.active()
            jobs = queue.jobs()
            if active == 0 and forwarded >= jobs:
                return time.monotonic() - started, jobs, forwarded
            if time.monotonic() - started > timeout:
                raise RuntimeError(
                    f"not drained after {timeout} s: {jobs} jobs, {active} active,"
                    f" {forwarded} forwarded"
                )
            time.sleep(0.01)

    def profile_start(self, target: Service, name: str) -> subprocess.Popen[bytes] | None:
        """py-spy record on ``target`` until profile_stop (raw folded stacks, per thread)."""
        if not self.args.profile:
            return None
        self.results_dir.mkdir(parents=True, exist_ok=True)
        out = self.results_dir / f"profile-{name}.txt"
        spy = subprocess.Popen(
            [
                str(_py_spy()),
                "record",
                "--pid",
                str(target.pid),
                "--rate",
                "250",
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.extra.setdefault("profiles", []).append(str(out))
        time.sleep(0.3)  # let it attach
        return spy

    def profile_stop(self, spy: subprocess.Popen[bytes] | None) -> None:
        if spy is None:
            return
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(10)

    # -- phases

    def run(self) -> None:
        a = self.args
        py = a.python
        started = time.monotonic()
        if a.queue == "postgres":
            self.say("PostgreSQL: " + ("--queue-url" if a.queue_url else "starting a cluster"))
            self.pg = Postgres(a.queue_url)
            self.extra["postgres"] = self.pg.info()
        vela_port = _free_port()
        vela: Vela = self._service(
            "fake-vela",
            [
                sys.executable,
                str(BENCH / "fake_vela.py"),
                "--port",
                str(vela_port),
                "--token",
                VELA_TOKEN,
            ],
            vela_port,
            Vela,
        )
        vela.start()
        base_port = _free_port()
        baseline = self._service(
            "baseline", [py, str(BENCH / "baseline.py"), "--port", str(base_port)], base_port
        )
        baseline.start()
        main_db, queue = self._queue_for("main")
        bridge = self._bridge("bridge", vela.url, main_db).start()
        self.say(
            f"bridge pid {bridge.pid}, baseline pid {baseline.pid}, fake Vela pid {vela.pid};"
            f" {len(self.bodies)} bodies of {len(self.bodies[0])} bytes; workdir {self.workdir}"
        )

        # Warm-up: connections, imports, caches; not recorded.
        self.wrk(baseline, 1, "warm")
        self.wrk(bridge, 1, "warm")
        self.wait_drained(vela, queue, 0)

        forwarded_total = 0
        bridge_time = 0.0
        for r in range(a.rounds):
            self.say(f"round {r + 1}/{a.rounds}: baseline")
            self.rounds["baseline"].append(self.wrk(baseline, a.duration, "base"))
            self.say(f"round {r + 1}/{a.rounds}: bridge")
            before = vela.stats()["unique"]
            spy = self.profile_start(bridge, "intake") if r == a.rounds - 1 else None
            result = self.wrk(bridge, a.duration, "bridge")
            self.profile_stop(spy)
            stats = vela.stats()
            jobs = queue.jobs()
            backlog = jobs - stats["unique"]
            drain_s, jobs, forwarded = self.wait_drained(vela, queue, 0)
            in_round = forwarded - before
            result.update(
                {
                    "forwarded_during_load": stats["unique"] - before,
                    "forwarded_during_load_per_s": round(
                        (stats["unique"] - before) / result["seconds"], 1
                    ),
                    "backlog_at_end": backlog,
                    "drain_s": round(drain_s, 3),
                    "drain_per_s": round(backlog / drain_s, 1) if backlog >= 100 else None,
                    "forwarded": in_round,
                    "forwarded_per_s": round(in_round / (result["seconds"] + drain_s), 1),
                }
            )
            forwarded_total += in_round
            bridge_time += result["seconds"] + drain_s
            self.rounds["bridge"].append(result)
            self.say(
                f"  baseline {self.rounds['baseline'][-1]['accepted_per_s']:.0f}/s,"
                f" bridge {result['accepted_per_s']:.0f}/s p99 {result['p99_ms']:.1f} ms,"
                f" backlog {backlog} drained in {drain_s:.2f} s"
            )
        stats = vela.stats()
        self.extra["main"] = {
            "forwarded_overall_per_s": round(forwarded_total / bridge_time, 1),
            "vela": stats,
            "queue_jobs": queue.jobs(),
            "bridge_memory_mb": bridge.memory_mb(),
            "bridge_cpu_s": round(bridge.cpu_seconds(), 2),
        }
        queue.close()
        bridge.stop()
        baseline.stop()

        self.standing_drain(vela)
        if not a.skip_backlog:
            self.backlog_rounds()
        self.extra["vela_final"] = vela.stats()
        self.extra["wall_seconds"] = round(time.monotonic() - started, 1)

    def standing_drain(self, vela: Vela) -> None:
        """A queue already holding ``--standing`` deliveries, forwarded with no intake at all."""
        count = self.args.standing
        db, reader = self._queue_for("standing")
        reader.close()
        self.say(f"standing drain: queueing {count} deliveries")
        prefill(db, self.bodies, count, f"{self.run_id}-standing")
        offset = vela.stats()["unique"]
        bridge = self._bridge("bridge-standing", vela.url, db)
        # Measured from the first forwarded delivery, so start-up time does not count.
        launched = time.monotonic()
        bridge.launch()
        assert bridge.proc is not None
        first_at, first_count, got, spy = None, 0, 0, None
        cpu0, disk0 = 0.0, 0
        while got < count:
            if bridge.proc.poll() is not None:
                raise RuntimeError(f"bridge-standing exited:\n{bridge.tail()}")
            if time.monotonic() - launched > 180:
                raise RuntimeError(f"standing drain: {got} of {count} after 180 s")
            time.sleep(0.01)
            got = vela.stats()["unique"] - offset
            if first_at is None and got > 0:
                first_at, first_count = time.monotonic(), got
                cpu0, disk0 = bridge.cpu_seconds(), bridge.disk_written()
                spy = self.profile_start(bridge, "drain")
        self.profile_stop(spy)
        assert first_at is not None
        seconds = time.monotonic() - first_at
        self.extra["standing_drain"] = {
            "deliveries": count,
            "seconds": round(seconds, 3),
            "per_s": round((count - first_count) / seconds, 1),
            "cpu_us_per_delivery": round(
                (bridge.cpu_seconds() - cpu0) / (count - first_count) * 1e6, 1
            ),
            "disk_kb_per_delivery": round(
                (bridge.disk_written() - disk0) / (count - first_count) / 1024, 1
            ),
            "bridge_memory_mb": bridge.memory_mb(),
        }
        self.say(f"  {count} forwarded at {self.extra['standing_drain']['per_s']:.0f}/s")
        bridge.stop()

    def backlog_rounds(self) -> None:
        """Intake with Vela down: an empty queue vs one already holding ``--backlog``."""
        a = self.args
        down = f"http://127.0.0.1:{_free_port()}"  # nothing listens: connection refused
        full_db, reader = self._queue_for("full")
        reader.close()
        empty_db, reader = self._queue_for("empty")
        reader.close()
        self.say(f"backlog: queueing {a.backlog} deliveries (Vela down)")
        took = prefill(full_db, self.bodies, a.backlog, f"{self.run_id}-backlog")
        self.extra["backlog_prefill"] = {
            "deliveries": a.backlog,
            "seconds": round(took, 1),
            "db_mb": (
                round(full_db.stat().st_size / 2**20, 1)
                if isinstance(full_db, Path)
                else self.pg.database_mb(full_db)
                if self.pg is not None
                else None
            ),
        }
        empty = self._bridge("bridge-empty", down, empty_db).start()
        full = self._bridge("bridge-full", down, full_db).start()
        self.wrk(empty, 1, "warm")
        self.wrk(full, 1, "warm")
        for r in range(a.rounds):
            self.say(f"backlog round {r + 1}/{a.rounds}: empty queue, then {a.backlog} queued")
            spy = self.profile_start(empty, "intake-vela-down") if r == a.rounds - 1 else None
            self.rounds["backlog_empty"].append(self.wrk(empty, a.duration, "empty"))
            self.profile_stop(spy)
            self.rounds["backlog_full"].append(self.wrk(full, a.duration, "full"))
            self.say(
                f"  empty {self.rounds['backlog_empty'][-1]['accepted_per_s']:.0f}/s,"
                f" full {self.rounds['backlog_full'][-1]['accepted_per_s']:.0f}/s"
            )
        self.extra["backlog_memory_mb"] = {
            "empty": empty.memory_mb(),
            "full": full.memory_mb(),
        }
        empty.stop()
        full.stop()

    # -- results

    def report(self) -> dict[str, Any]:
        a = self.args
        r = self.rounds
        med: Callable[[str, str], float | None] = lambda kind, key: _median(  # noqa: E731
            [x[key] for x in r[kind] if x.get(key) is not None]
        )
        base = med("baseline", "accepted_per_s")
        brid = med("bridge", "accepted_per_s")
        empty = med("backlog_empty", "accepted_per_s")
        full = med("backlog_full", "accepted_per_s")
        main = self.extra.get("main", {})
        peaks = [main.get("bridge_memory_mb", {}).get("VmHWM")]
        peaks += [m.get("VmHWM") for m in self.extra.get("backlog_memory_mb", {}).values()]
        peaks.append(self.extra.get("standing_drain", {}).get("bridge_memory_mb", {}).get("VmHWM"))
        drains = [x["drain_per_s"] for x in r["bridge"] if x.get("drain_per_s")]
        standing = self.extra.get("standing_drain", {}).get("per_s")
        bridge_rounds = r["bridge"] + r["backlog_empty"] + r["backlog_full"]
        summary = {
            "baseline_accepted_per_s": base,
            "bridge_accepted_per_s": brid,
            "intake_ratio": round(brid / base, 3) if base and brid else None,
            "baseline_p50_ms": med("baseline", "p50_ms"),
            "baseline_p99_ms": med("baseline", "p99_ms"),
            "bridge_p50_ms": med("bridge", "p50_ms"),
            "bridge_p99_ms": max((x["p99_ms"] for x in r["bridge"]), default=None),
            "bridge_p99_ms_median": med("bridge", "p99_ms"),
            "drain_after_load_per_s": _median(drains),
            "drain_standing_per_s": standing,
            "forwarded_overall_per_s": main.get("forwarded_overall_per_s"),
            "forwarded_during_load_per_s": med("bridge", "forwarded_during_load_per_s"),
            "duplicates": self.extra.get("vela_final", {}).get("duplicates"),
            "non_2xx": sum(x["non_2xx"] + x["socket_errors"] for x in bridge_rounds),
            "other_2xx": sum(x["other_2xx"] for x in bridge_rounds),
            "baseline_non_2xx": sum(x["non_2xx"] + x["socket_errors"] for x in r["baseline"]),
            "backlog_empty_accepted_per_s": empty,
            "backlog_full_accepted_per_s": full,
            "backlog_ratio": round(full / empty, 3) if empty and full else None,
            "rss_peak_mb": max((p for p in peaks if p is not None), default=None),
            "rss_peak_mb_main": main.get("bridge_memory_mb", {}).get("VmHWM"),
            "bridge_cpu_us_per_request": med("bridge", "server_cpu_us_per_request"),
            "baseline_cpu_us_per_request": med("baseline", "server_cpu_us_per_request"),
            "bridge_main_thread_cpu_us_per_request": med(
                "bridge", "server_main_thread_cpu_us_per_request"
            ),
            "bridge_disk_kb_per_request": med("bridge", "server_disk_kb_per_request"),
            "vela_down_cpu_us_per_request": med("backlog_empty", "server_cpu_us_per_request"),
            "vela_down_disk_kb_per_request": med("backlog_empty", "server_disk_kb_per_request"),
            "drain_cpu_us_per_delivery": self.extra.get("standing_drain", {}).get(
                "cpu_us_per_delivery"
            ),
            "drain_disk_kb_per_delivery": self.extra.get("standing_drain", {}).get(
                "disk_kb_per_delivery"
            ),
        }
        if a.queue == "postgres":
            # The bridge's own CPU/disk figures above leave out the database server's work.
            summary["db_server_cpu_us_per_request"] = med("bridge", "db_server_cpu_us_per_request")
            summary["db_server_disk_kb_per_request"] = med(
                "bridge", "db_server_disk_kb_per_request"
            )
            summary["vela_down_db_server_cpu_us_per_request"] = med(
                "backlog_empty", "db_server_cpu_us_per_request"
            )
        targets = []
        for name, op, target, text in TARGETS:
            value = summary.get(name)
            ok = None if value is None else (value >= target if op == ">=" else value <= target)
            targets.append(
                {"figure": name, "value": value, "op": op, "target": target, "ok": ok, "what": text}
            )
        return {
            "meta": {
                "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "mode": "quick" if a.quick else "full",
                "queue": a.queue,
                "rounds": a.rounds,
                "round_seconds": a.duration,
                "connections": a.connections,
                "wrk_threads": a.threads,
                "lanes": a.lanes,
                "body_bytes": len(self.bodies[0]),
                "backlog": None if a.skip_backlog else a.backlog,
                "standing": a.standing,
                "bridge_log_level": a.log_level,
                "python": a.python,
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "versions": _versions(a.python),
                "wall_seconds": self.extra.get("wall_seconds"),
            },
            "summary": summary,
            "targets": targets,
            "rounds": r,
            "details": {k: v for k, v in self.extra.items() if k != "wall_seconds"},
        }


def _py_spy() -> Path | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return local
    found = shutil.which("py-spy")
    return Path(found) if found else None


def _versions(python: str) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for n in ('vela-bridge', 'starlette', 'uvicorn', 'aiohttp', 'orjson', 'uvloop',"
        " 'httptools', 'h11'):\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=30, env=_env()
        )
        versions: dict[str, str] = json.loads(done.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        versions = {}
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    versions["wrk"] = (wrk.stdout or wrk.stderr).split("[")[0].strip()
    return versions


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _print_table(report: dict[str, Any]) -> None:
    s = report["summary"]
    m = report["meta"]
    print(
        f"\nvela-bridge benchmark ({m['queue']} queue, {m['mode']}:"
        f" {m['rounds']}×{m['round_seconds']:g} s,"
        f" {m['connections']} connections, {m['body_bytes']} B bodies, {m['lanes']} lanes)"
    )
    rows = [
        ("accepted/s bare Starlette", s["baseline_accepted_per_s"], ""),
        ("accepted/s bridge", s["bridge_accepted_per_s"], ""),
        (
            "p50 / p99 ms baseline",
            f"{_fmt(s['baseline_p50_ms'])} / {_fmt(s['baseline_p99_ms'])}",
            "",
        ),
        ("p50 ms bridge", s["bridge_p50_ms"], ""),
        ("forwarded/s during load", s["forwarded_during_load_per_s"], ""),
        ("drain/s after a load round", s["drain_after_load_per_s"], ""),
        ("drain/s standing backlog, no intake", s["drain_standing_per_s"], ""),
        ("forwarded/s overall (load+drain)", s["forwarded_overall_per_s"], ""),
        ("accepted/s Vela down, empty queue", s["backlog_empty_accepted_per_s"], ""),
        ("accepted/s Vela down, backlog queued", s["backlog_full_accepted_per_s"], ""),
        ("server CPU µs/request baseline", s["baseline_cpu_us_per_request"], ""),
        ("bridge CPU µs/request (intake+forward)", s["bridge_cpu_us_per_request"], ""),
        ("  of which the event loop's thread", s["bridge_main_thread_cpu_us_per_request"], ""),
        ("bridge CPU µs/request, Vela down", s["vela_down_cpu_us_per_request"], ""),
        ("bridge CPU µs/forward, standing drain", s["drain_cpu_us_per_delivery"], ""),
        ("disk KB/request (intake+forward)", s["bridge_disk_kb_per_request"], ""),
        ("disk KB/forward, standing drain", s["drain_disk_kb_per_delivery"], ""),
    ]
    if "db_server_cpu_us_per_request" in s:
        rows += [
            ("PostgreSQL CPU µs/request (intake+fwd)", s["db_server_cpu_us_per_request"], ""),
            (
                "PostgreSQL CPU µs/request, Vela down",
                s["vela_down_db_server_cpu_us_per_request"],
                "",
            ),
            ("PostgreSQL disk KB/request", s["db_server_disk_kb_per_request"], ""),
        ]
    for t in report["targets"]:
        mark = {True: "ok", False: "MISSED", None: "n/a"}[t["ok"]]
        rows.append((t["what"], t["value"], mark))
    width = max(len(r[0]) for r in rows)
    for name, value, mark in rows:
        text = value if isinstance(value, str) else _fmt(value)
        print(f"  {name:<{width}}  {text:>12}  {mark}")


if __name__ == "__main__":
    sys.exit(main())
