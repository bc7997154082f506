"""The ledger every scenario ends with: published = delivered + visibly failed, lost = 0.

Each event carries a unique `n` in its event_data. Delivered: the receiver accepted it
(valid signature, 2xx, in time) or its row is `succeeded`. Visibly failed: its row is
`failed` or `rejected`. Lost: neither. A duplicate is an event the receiver accepted more
than once; that is allowed for what was in flight, but only under one `webhook-id`.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.reliability.harness import Database
from tests.reliability.servers import Receiver

RESULTS_ENV = "WEBHOOKS_RELIABILITY_RESULTS"


@dataclass
class Settled:
    scenario: str
    events: int
    faults: str
    delivered: int
    failed: int  # failed or rejected rows
    lost: int
    duplicates: int
    recovery_seconds: float | None
    command: str
    lost_ns: list[int] = field(default_factory=list)
    duplicate_ids: dict[int, list[str]] = field(default_factory=dict)  # n -> webhook-ids
    bad_signatures: int = 0
    unexpected: list[int] = field(default_factory=list)

    def line(self) -> str:
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f}s"
        return (f"[reliability] {self.scenario}: events={self.events} "
                f"delivered={self.delivered} failed/rejected={self.failed} lost={self.lost} "
                f"duplicates={self.duplicates} recovery={recovery} faults: {self.faults}")

    @property
    def mismatched_duplicates(self) -> dict[int, list[str]]:
        """Events accepted more than once under different webhook-ids: not deduplicable."""
        return {n: ids for n, ids in self.duplicate_ids.items() if len(set(ids)) > 1}


class Ledger:
    def __init__(self, scenario: str, faults: str, command: str) -> None:
        self.scenario, self.faults, self.command = scenario, faults, command
        self.published: dict[int, str] = {}  # n -> endpoint id
        self._next = 0
        self.recovery_seconds: float | None = None

    def event_data(self, endpoint_id: str, **extra: Any) -> dict[str, Any]:
        """A fresh event for `endpoint_id`, counted as published."""
        n = self._next
        self._next += 1
        self.published[n] = endpoint_id
        return {"type": "reliability.test", "scenario": self.scenario, "n": n, **extra}

    def single(self, endpoint_id: str, *, idempotent: bool = False) -> dict[str, Any]:
        """`.delay()` keyword arguments for one fresh event."""
        data = self.event_data(endpoint_id)
        call: dict[str, Any] = {"webhook_id": endpoint_id, "event_data": data}
        if idempotent:
            call["idempotency_key"] = f"{self.scenario}-{data['n']}"
        return call

    def outstanding(self, receiver: Receiver, database: Database | None = None) -> set[int]:
        """Published events neither delivered nor visibly failed yet."""
        left = set(self.published) - receiver.delivered_ns()
        if left and database is not None:
            for row in database.rows():
                event = row.event()
                if event and event.get("scenario") == self.scenario and row.status in (
                        "succeeded", "failed", "rejected"):
                    left.discard(event.get("n"))  # type: ignore[arg-type]
        return left

    def wait_settled(self, receiver: Receiver, database: Database, timeout: float) -> float:
        """Wait (bounded) until nothing is outstanding; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        last_db = 0.0
        while True:
            use_db = time.monotonic() - last_db > 1.0
            if use_db:
                last_db = time.monotonic()
            if not self.outstanding(receiver, database if use_db else None):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                return time.monotonic() - started  # check() then says what is missing
            time.sleep(0.2)

    def settle(self, receiver: Receiver, database: Database) -> Settled:
        hits = receiver.snapshot()
        accepted: dict[int, list[str]] = defaultdict(list)
        unexpected = set()
        for hit in hits:
            if hit.delivered and hit.n is not None:
                if hit.n in self.published:
                    accepted[hit.n].append(hit.webhook_id or "?")
                else:
                    unexpected.add(hit.n)
        succeeded, failed = set(), set()
        for row in database.rows():
            event = row.event()
            if not event or event.get("scenario") != self.scenario:
                continue
            if row.status == "succeeded":
                succeeded.add(event.get("n"))
            elif row.status in ("failed", "rejected"):
                failed.add(event.get("n"))
        delivered = (set(accepted) | succeeded) & set(self.published)
        failed_only = (failed & set(self.published)) - delivered
        lost = sorted(set(self.published) - delivered - failed_only)
        duplicates = {n: ids for n, ids in accepted.items() if len(ids) > 1}
        return Settled(
            scenario=self.scenario, events=len(self.published), faults=self.faults,
            delivered=len(delivered), failed=len(failed_only), lost=len(lost),
            duplicates=sum(len(ids) - 1 for ids in duplicates.values()),
            recovery_seconds=self.recovery_seconds, command=self.command, lost_ns=lost,
            duplicate_ids=duplicates, bad_signatures=sum(1 for h in hits if not h.verified),
            unexpected=sorted(unexpected))

    def record(self, settled: Settled) -> None:
        """Print the result line; append a JSON row where WEBHOOKS_RELIABILITY_RESULTS says."""
        print(settled.line())
        path = os.environ.get(RESULTS_ENV)
        if path:
            row = {k: v for k, v in asdict(settled).items()
                   if k in ("scenario", "events", "faults", "delivered", "failed", "lost",
                            "duplicates", "recovery_seconds", "command")}
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")

    def finish(self, receiver: Receiver, database: Database) -> Settled:
        """Settle and record (before any assertion, so a failing run is recorded too)."""
        settled = self.settle(receiver, database)
        self.record(settled)
        return settled

    @staticmethod
    def assert_promise(settled: Settled, *, duplicates_allowed: bool = True,
                       expect_failed: int = 0, context: str = "") -> None:
        """Nothing lost, nothing unaccounted for, duplicates only under one webhook-id."""
        assert settled.bad_signatures == 0, (
            f"{settled.bad_signatures} requests failed standardwebhooks verification")
        assert settled.lost == 0, (
            f"{settled.lost} of {settled.events} events LOST (neither delivered nor a "
            f"failed/rejected row), e.g. n={settled.lost_ns[:10]}; {context}{settled.line()}")
        assert not settled.mismatched_duplicates, (
            "events delivered twice under different webhook-ids (receivers cannot dedupe): "
            f"{dict(list(settled.mismatched_duplicates.items())[:5])}")
        if not duplicates_allowed:
            assert settled.duplicates == 0, (
                f"{settled.duplicates} duplicate deliveries where nothing was in flight: "
                f"{dict(list(settled.duplicate_ids.items())[:5])}")
        assert settled.failed == expect_failed, (
            f"{settled.failed} events ended failed/rejected, expected {expect_failed}: "
            f"{settled.line()}")
        assert not settled.unexpected, f"receiver accepted unpublished events {settled.unexpected}"

    def check(self, receiver: Receiver, database: Database, *,
              duplicates_allowed: bool = True, expect_failed: int = 0) -> Settled:
        settled = self.finish(receiver, database)
        self.assert_promise(settled, duplicates_allowed=duplicates_allowed,
                            expect_failed=expect_failed)
        return settled
