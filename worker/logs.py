"""Logging that reads well in journalctl and in a terminal."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

# journald reads a "<N>" prefix on stdout as the syslog priority of the line.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds one); the level as a syslog priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>" + super().format(record).replace("\n", "\n" + f"<{priority}>")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; an attempt's fields (`extra={"fields": …}`) as keys."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {}
        if not self.journal:  # journald stamps each line itself
            line["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds")
        line.update(level=record.levelname, logger=record.name, pid=record.process,
                    msg=record.getMessage())
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: _json_value(v) for k, v in fields.items()})
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        text = orjson.dumps(line).decode()
        if self.journal:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>" + text
        return text


def _json_value(value: object) -> object:
    """A field as JSON: scalars as they are, times in ISO 8601 as the logfmt lines have them."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def configure(level: str = "INFO", *, journal: bool = False, fmt: str = "logfmt") -> None:
    """Route every logger (ours, Celery's) to one stdout handler."""
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(journal=journal))
    elif journal:
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s[%(process)d]: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
