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


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line, keeping its extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
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
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
