"""Logging setup for `kaldrix serve`: text or JSON lines, to stderr or a file."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

from .config import LOG_LEVELS, Config


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            entry["audit"] = fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(config: Config) -> None:
    """Route kaldrix's loggers per the config; quiet the libraries' debug chatter."""
    handler: logging.Handler
    handler = logging.FileHandler(config.log_file) if config.log_file else logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    level = LOG_LEVELS[config.log_level]
    kaldrix_logger = logging.getLogger("kaldrix")
    kaldrix_logger.setLevel(level)
    if config.log_level == "verbose":
        logging.getLogger("trio-websocket").setLevel(logging.DEBUG)
    # The Redis broker reports outages itself, once, in its own words.
    logging.getLogger("coredis").setLevel(logging.CRITICAL)
