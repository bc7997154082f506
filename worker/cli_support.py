"""What every `webhooks` command module shares: a Store for one command, JSON output."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from worker.db.connection import create_engine
from worker.db.store import Store, open_store
from worker.settings import Settings

T = TypeVar("T")


def with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run `work` on a Store of its own (engine made and disposed here), in a fresh loop."""

    async def run() -> T:
        engine = create_engine(settings)
        try:
            return await work(open_store(engine, settings))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
