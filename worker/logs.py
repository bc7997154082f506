"""Logging that reads well in journalctl and in a terminal."""

from __future__ import annotations

import logging
import sys

# journald reads a "<N>" prefix on stdout as the syslog priority of the line.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds one); the level as a syslog priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>" + super().format(record).replace("\n", "\n" + f"<{priority}>")


def configure(level: str = "INFO", *, journal: bool = False) -> None:
    """Route every logger (ours, Celery's) to one stdout handler."""
    handler = logging.StreamHandler(sys.stdout)
    if journal:
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s[%(process)d]: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
