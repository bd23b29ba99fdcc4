"""Structured logs: one JSON object per line, with the `extra={...}` fields of each call.

`log.info("round closed", extra={"round_id": 4, "new_version": 5})` becomes
`{"ts": "...", "level": "INFO", "logger": "aggregator.worker", "msg": "round closed",
"round_id": 4, "new_version": 5}`, which log pipelines index without parsing prose.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """Human-readable lines that still carry the extra fields, as `key=value` after the message."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {fields}{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line, keeping its extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(_extras(record))
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure(*, json_lines: bool = True, level: int = logging.INFO) -> None:
    """Send the `aggregator` loggers to stderr, as JSON lines unless json_lines is False."""
    logger = logging.getLogger("aggregator")
    if any(getattr(h, "_fedkb", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._fedkb = True
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
