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


async def test_fifo_events_are_committed_in_order_and_left_to_the_claim_loop(
    store: Store, engine_parts: Any
) -> None:
    """Nothing of a FIFO endpoint is sent straight from intake: the claim loop hands out
    each queue's head, and the intake says when there is one to look for."""
    from worker.core.models import Endpoint, Ordering
    from worker.core.signing import generate_secret
    from worker.delivery.intake import Intake, IntakeConfig
    from worker.settings import Settings

    parts = await engine_parts(store)
    await store.add_endpoint(Endpoint(id="ep-f", url="http://127.0.0.1:9/",
                                      secrets=(generate_secret(),), ordering=Ordering.FIFO))
    woken: list[Any] = []
    intake = Intake(IntakeConfig.from_settings(Settings(database_url="sqlite://")), store,
                    parts.scheduler, on_queued=woken.append)
    items = [Incoming(f"t-{n}:0", EventIn("ep-f", {"n": n}, ordering_key=key))
             for n, key in enumerate(["a", "b", "a", None])]
    report = await intake.accept(items)
    assert len(report.accepted) == 4 and len(woken) == 1
    assert parts.sender.sent == [] and parts.scheduler.in_flight == 0

    claimed, _ = await parts.sweeper.sweep()
    assert claimed == 3  # the heads of a, b and the endpoint's unkeyed queue
    await parts.wait_recorded(3)
    assert sorted(parts.sender.sent) == sorted(report.accepted[i] for i in (0, 1, 3))
    await parts.sweeper.sweep()  # the second of queue a, now its head
    await parts.wait_recorded(4)
    assert parts.sender.sent[-1] == report.accepted[2]
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
