"""Structured logs: one JSON object per line, or readable text on a terminal.

Log calls pass the delivery GUID, repo, event and action through ``extra=``
(STYLE.md 12); both formatters print them. Secrets never reach a log call: the
config wraps them in :class:`bridge.config.Secret`, which prints as asterisks.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from bridge.config import LogConfig

# Attributes every LogRecord has; anything else came in through extra=.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


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
    # uvicorn's access log would repeat every delivery without its fields.
    logging.getLogger("uvicorn.access").disabled = True
