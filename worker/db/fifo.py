"""FIFO numbering (PROVISIONAL stand-in for part 2's module; on merge, main's version wins)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection


async def number_fifo_rows(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Part 2 gives each row with an ordering key its fifo_seq; nothing to do before it."""


def number_fifo_rows_sync(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Part 2 gives each row with an ordering key its fifo_seq; nothing to do before it."""
