"""Intake on a real database: commit, dedupe, reject."""

from __future__ import annotations

from collections import Counter
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


async def test_every_row_names_the_task_that_carried_it(store: Store, engine_parts: Any) -> None:
    """`deliveries show <task id>` and the per-message parts of a gathered commit rest on it."""
    parts = await engine_parts(store)
    items = [Incoming("batch-1:0", EventIn("ep-a", {"n": 0})),
             Incoming("batch-1:1", EventIn("nope", {"n": 1})),
             Incoming("single-2:0", EventIn("ep-a", {"n": 2})),
             Incoming("raw-0badc0de", EventIn("?", None))]  # a message that carried no id
    report = await parts.intake.accept(items)
    rows = {r["id"]: r["task_id"] for r in await store.list_deliveries(limit=10)}
    assert Counter(rows.values()) == {"batch-1": 2, "single-2": 1, None: 1}
    split = report.by_task()
    assert [rows[i] for i in split["batch-1"].accepted] == ["batch-1"]
    assert [r.code for r in split["batch-1"].rejected] == ["unknown_endpoint"]
    assert [rows[i] for i in split["single-2"].accepted] == ["single-2"]
    assert Counter(r.task_id for r in report.rejected) == {"batch-1": 1, None: 1}

    again = (await parts.intake.accept(items[2:3])).by_task()  # redelivered: a duplicate
    assert (again["single-2"].accepted, again["single-2"].duplicates) == ([], 1)
    await parts.stop()
