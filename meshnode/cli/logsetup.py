"""Logging configuration; called only by the CLI (library code never configures logging)."""

from __future__ import annotations

import json
import logging
import sys


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def level_for(verbosity: int) -> int:
    """The level of meshnode's own loggers: -1 (or less) warnings, 0 info, 1 (or more) debug."""
    if verbosity <= -1:
        return logging.WARNING
    return logging.INFO if verbosity == 0 else logging.DEBUG


def configure_logging(verbosity: int = 0, fmt: str = "text") -> None:
    """verbosity: -1 warnings only, 0 info, 1 debug for meshnode, 2 debug for everything."""
    level = level_for(verbosity)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    for name in ("meshnode", "signaling"):
        logging.getLogger(name).setLevel(level)
    # aiortc/aioice are chatty at INFO; keep them quiet unless asked.
    for name in ("aiortc", "aioice", "aiomqtt", "websockets"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
