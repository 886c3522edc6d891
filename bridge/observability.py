"""Structured logs and Prometheus metrics.

Logs: one JSON object per line, or readable text on a terminal.

Log calls pass the delivery GUID, repo, event and action through ``extra=``
(STYLE.md 12); both formatters print them. Secrets never reach a log call: the
config wraps them in :class:`bridge.config.Secret`, which prints as asterisks.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram

from bridge.config import LogConfig

# Attributes every LogRecord has; anything else came in through extra=.
# uvicorn adds color_message (the message with ANSI colours): not for a log file.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _extra(record).items() if v not in (None, ""))
        return f"{text}  {fields}" if fields else text


def configure_logging(config: LogConfig, stream: Any = None) -> None:
    stream = stream or sys.stderr
    use_json = config.format == "json" or (
        config.format == "auto" and not getattr(stream, "isatty", lambda: False)()
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # Neither formatter prints the thread, the process or the caller's file and line, so
    # LogRecord need not look them up on every call (logging HOWTO, "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the HOWTO's documented switch for the caller lookup
    # uvicorn's access log would repeat every delivery without its fields.
    logging.getLogger("uvicorn.access").disabled = True


# -- metrics (interface.md "Operations"), per process, on prometheus_client's registry --

RECEIVED = Counter(
    "vela_bridge_deliveries_received_total",
    "Webhook deliveries received, by GitHub event and what the bridge answered.",
    ["event", "outcome"],
)
FORWARD_ATTEMPTS = Counter(
    "vela_bridge_forward_attempts_total",
    "Requests made to Vela, by endpoint and result class.",
    ["endpoint", "result"],
)
FINISHED = Counter(
    "vela_bridge_deliveries_finished_total",
    "Deliveries that reached a final state (skipped at intake included).",
    ["state"],
)
QUEUE_DEPTH = Gauge(
    "vela_bridge_queue_depth", "Jobs not yet finished: pending, in flight or waiting to retry."
)
OLDEST_PENDING_AGE = Gauge(
    "vela_bridge_queue_oldest_pending_age_seconds",
    "Age of the oldest job not yet finished (0 when the queue is empty).",
)
INTAKE_DURATION = Histogram(
    "vela_bridge_intake_duration_seconds",
    "Time from a webhook request's start to its answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
FORWARD_DURATION = Histogram(
    "vela_bridge_forward_duration_seconds",
    "Duration of one request to Vela.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
FORWARDING_PAUSED = Gauge(
    "vela_bridge_forwarding_paused", "1 while Vela refuses the token and forwarding waits."
)


def attempt_result(status: int | None) -> str:
    """The ``result`` label of an attempt: 2xx, 4xx, 429, 5xx, or error (no answer)."""
    if status is None:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx" if 200 <= status < 600 and status // 100 != 3 else "error"
