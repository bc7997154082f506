"""Intake on a real database: commit, dedupe, reject."""

from __future__ import annotations

from typing import Any

from worker.core.models import EventIn, Incoming
from worker.db.store import Store


async def test_accept_commits_dedupes_redelivery_and_records_rejections(
    store: Store, engine_parts: Any
) -> None:
    parts = await engine_parts(store)
    intake, sender = parts.intake, parts.sender
    items = [Incoming(f"task-{n}:0", EventIn("ep-a", {"n": n})) for n in range(50)]
    items.append(Incoming("task-x:0", EventIn("nope", {"n": 1})))
    items.append(Incoming("task-y:0", EventIn("ep-a", ["not", "an", "object"])))
    report = await intake.accept(items)
    assert len(report.accepted) == 50 and report.duplicates == 0
    assert sorted(r.code for r in report.rejected) == ["payload_not_object", "unknown_endpoint"]

    again = await intake.accept(items)  # the broker redelivered the same messages
    assert again.accepted == [] and again.duplicates == 50
    await parts.wait_recorded(50)
    assert sorted(sender.sent) == sorted(report.accepted)
    assert await store.status_counts() == {"succeeded": 50, "rejected": 2}
    await parts.stop()
