"""Gatherer with a fake `accept`: groups by size and by interval, settling only after a commit
landed (exactly once), backoff while the store is away, rejection after repeated unexpected
failures, and what close() leaves to the broker.

Timing bounds are lower bounds on asyncio's own timers, or generous upper bounds (`until`).
The retry waits are read from a spy standing in for the gatherer module's `asyncio`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from worker.core.errors import EngineUnavailable, StoreUnavailable
from worker.core.messages import task_id_of
from worker.core.models import AcceptReport, EventIn, Incoming
from worker.delivery import gatherer as gatherer_module
from worker.delivery.gatherer import MAX_UNEXPECTED_FAILURES, GatherConfig, Gatherer

pytestmark = pytest.mark.timeout(30)

Until = Callable[..., Awaitable[None]]


def message(name: str, size: int = 1, excerpt: bytes | None = None) -> list[Incoming]:
    """The items one broker message carries: ids `name:0`, `name:1`, ..."""
    return [Incoming(f"{name}:{i}", EventIn("ep", {"n": i}), excerpt=excerpt)
            for i in range(size)]


class FakeAccept:
    """Records every call; raises the queued failures in order, one per call; can be held."""

    def __init__(self, failures: Sequence[BaseException] = ()) -> None:
        self.failures = list(failures)
        self.calls: list[list[Incoming]] = []
        self.call_times: list[float] = []
        self.landed: set[str] = set()  # message ids of calls that returned
        self.gate: asyncio.Event | None = None
        self.hang: float = 0.0  # the first call sleeps this long (for accept_timeout)

    async def __call__(self, items: Sequence[Incoming]) -> AcceptReport:
        self.calls.append(list(items))
        self.call_times.append(time.monotonic())
        if self.hang and len(self.calls) == 1:
            await asyncio.sleep(self.hang)
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.landed.update(item.message_id for item in items)
        # Delivery ids stand in as the message ids; each names its task as intake's do.
        return AcceptReport(accepted=[item.message_id for item in items],
                            task_of={item.message_id: task_id_of(item.message_id)
                                     for item in items})


class Settles:
    """Settle callbacks that count, and check that their message's commit had landed."""

    def __init__(self, accept: FakeAccept) -> None:
        self.accept = accept
        self.counts: Counter[str] = Counter()
        self.early: list[str] = []
        self.parts: dict[str, AcceptReport] = {}

    def of(self, name: str, items: Sequence[Incoming]) -> Callable[[AcceptReport], None]:
        def settle(part: AcceptReport) -> None:
            self.counts[name] += 1
            self.parts[name] = part
            if not {item.message_id for item in items} <= self.accept.landed:
                self.early.append(name)

        return settle

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class AsyncioSpy:
    """Stands in for `asyncio` in the gatherer module: records every `sleep` it asks for."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.waits.append(delay)
        return await asyncio.sleep(delay, result)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> AsyncioSpy:
    spy = AsyncioSpy()
    monkeypatch.setattr(gatherer_module, "asyncio", spy)
    return spy


DEFAULTS: dict[str, Any] = {"gather_size": 3, "gather_interval": 0.02, "accept_timeout": 5.0,
                            "retry_delay": 0.01, "max_retry_delay": 0.08}


@pytest.fixture
async def make_gatherer() -> AsyncIterator[Callable[..., Gatherer]]:
    """`make_gatherer(accept, **config)`: a started Gatherer, closed at teardown."""
    made: list[Gatherer] = []

    def make(accept: FakeAccept, **overrides: Any) -> Gatherer:
        gatherer = Gatherer(GatherConfig(**{**DEFAULTS, **overrides}), accept)
        gatherer.start()
        made.append(gatherer)
        return gatherer

    yield make
    for gatherer in made:
        await gatherer.close()


def add(gatherer: Gatherer, settles: Settles, name: str, size: int = 1,
        excerpt: bytes | None = None) -> list[Incoming]:
    items = message(name, size, excerpt)
    gatherer.add(items, settles.of(name, items))
    return items


def ids(items: Sequence[Incoming]) -> list[str]:
    return [item.message_id for item in items]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "webhooks.gatherer" and r.levelno == logging.WARNING]


# grouping ----------------------------------------------------------------------------------------


async def test_a_full_group_commits_without_waiting_for_the_interval(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=3, gather_interval=30.0)
    for name in "abc":
        add(gatherer, settles, name)
    await until(lambda: settles.total == 3, 3.0)
    assert [ids(call) for call in accept.calls] == [["a:0", "b:0", "c:0"]]
    assert settles.counts == {"a": 1, "b": 1, "c": 1}
    assert settles.early == []
    assert gatherer.waiting == 0
    assert gatherer.stats == {"gathered": 3, "committed": 3, "commit_failures": 0}


async def test_full_groups_are_taken_in_order_and_the_rest_follows(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=3, gather_interval=0.05)
    for n in range(7):
        add(gatherer, settles, f"m{n}")
    await until(lambda: settles.total == 7, 3.0)
    assert [ids(call) for call in accept.calls] == [
        ["m0:0", "m1:0", "m2:0"], ["m3:0", "m4:0", "m5:0"], ["m6:0"]]
    assert all(count == 1 for count in settles.counts.values())


async def test_a_partial_group_commits_after_the_interval(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=100, gather_interval=0.3)
    added_at = time.monotonic()
    add(gatherer, settles, "a")
    add(gatherer, settles, "b", 2)
    await asyncio.sleep(0.1)
    assert accept.calls == [] and settles.total == 0
    await until(lambda: settles.total == 2, 5.0)
    assert [ids(call) for call in accept.calls] == [["a:0", "b:0", "b:1"]]
    assert accept.call_times[0] - added_at >= 0.29


async def test_a_message_is_never_split_across_groups(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=3, gather_interval=0.02)
    sizes = {"a": 2, "b": 2, "c": 5, "d": 1, "e": 1, "f": 1, "g": 4}
    for name, size in sizes.items():
        add(gatherer, settles, name, size)
    await until(lambda: settles.total == len(sizes), 5.0)
    seen: Counter[str] = Counter()
    for call in accept.calls:
        names = Counter(item.message_id.split(":")[0] for item in call)
        for name, count in names.items():
            assert count == sizes[name], f"{name} split: {ids(call)}"
            seen[name] += 1
    assert seen == dict.fromkeys(sizes, 1)
    # A group goes past gather_size rather than cut a message; a big message goes alone.
    assert [ids(call) for call in accept.calls] == [
        ["a:0", "a:1", "b:0", "b:1"],
        [f"c:{i}" for i in range(5)],
        ["d:0", "e:0", "f:0"],
        [f"g:{i}" for i in range(4)],
    ]


async def test_settle_waits_for_accept_to_return(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept()
    accept.gate = asyncio.Event()
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=2)
    add(gatherer, settles, "a")
    add(gatherer, settles, "b")
    await until(lambda: len(accept.calls) == 1, 3.0)
    await asyncio.sleep(0.05)
    assert settles.total == 0
    accept.gate.set()
    await until(lambda: settles.total == 2, 3.0)
    assert settles.counts == {"a": 1, "b": 1}
    assert settles.early == []


async def test_every_message_is_settled_exactly_once(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=5, gather_interval=0.01)
    sizes = {f"m{n}": 1 + n % 4 for n in range(60)}
    for n, (name, size) in enumerate(sizes.items()):
        add(gatherer, settles, name, size)
        if n % 7 == 0:
            await asyncio.sleep(0.003)  # some arrive while a group is being committed
    await until(lambda: settles.total == len(sizes), 5.0)
    await asyncio.sleep(0.05)
    assert settles.counts == dict.fromkeys(sizes, 1)
    committed = [item.message_id for call in accept.calls for item in call]
    assert sorted(committed) == sorted(f"{name}:{i}" for name, size in sizes.items()
                                       for i in range(size))
    assert settles.early == []
    assert gatherer.waiting == 0


# the store away ----------------------------------------------------------------------------------


async def test_store_unavailable_keeps_the_group_and_backs_off_doubling_to_the_cap(
    make_gatherer: Callable[..., Gatherer], until: Until, sleeps: AsyncioSpy,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "webhooks.gatherer")
    accept = FakeAccept([StoreUnavailable("database is down")] * 5)
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=2, retry_delay=0.01, max_retry_delay=0.08)
    add(gatherer, settles, "a")
    add(gatherer, settles, "b")
    await until(lambda: settles.total == 2, 5.0)
    assert len(accept.calls) == 6
    assert all(ids(call) == ["a:0", "b:0"] for call in accept.calls)
    assert settles.counts == {"a": 1, "b": 1}
    assert settles.early == []  # nothing settled while the store was away
    assert sleeps.waits == [0.01, 0.02, 0.04, 0.08, 0.08]
    gaps = [b - a for a, b in zip(accept.call_times, accept.call_times[1:], strict=False)]
    for gap, wait in zip(gaps, sleeps.waits, strict=True):
        assert gap >= wait * 0.95
    warnings = warnings_of(caplog)
    assert len(warnings) == 5
    assert all("StoreUnavailable" in r.getMessage() and "database is down" in r.getMessage()
               for r in warnings)
    assert gatherer.stats["commit_failures"] == 5
    assert gatherer.stats["committed"] == 2


async def test_nothing_is_settled_while_the_store_stays_away(
    make_gatherer: Callable[..., Gatherer], until: Until, sleeps: AsyncioSpy
) -> None:
    accept = FakeAccept([StoreUnavailable("down")] * 1000)
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=1, retry_delay=0.005, max_retry_delay=0.01)
    add(gatherer, settles, "a", 2)
    await until(lambda: len(accept.calls) >= 8, 5.0)
    add(gatherer, settles, "b")  # arrives during the outage, waits behind the first group
    await until(lambda: len(accept.calls) >= 12, 5.0)
    assert settles.total == 0
    assert gatherer.waiting >= 1
    assert max(sleeps.waits) == 0.01
    accept.failures.clear()
    await until(lambda: settles.total == 2, 5.0)
    assert settles.counts == {"a": 1, "b": 1}
    assert settles.early == []


async def test_the_backoff_starts_over_after_a_commit(
    make_gatherer: Callable[..., Gatherer], until: Until, sleeps: AsyncioSpy
) -> None:
    accept = FakeAccept([StoreUnavailable("down")] * 3)
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=1, retry_delay=0.01, max_retry_delay=0.08)
    add(gatherer, settles, "a")
    await until(lambda: settles.total == 1, 5.0)
    assert sleeps.waits == [0.01, 0.02, 0.04]
    accept.failures.append(StoreUnavailable("down again"))
    add(gatherer, settles, "b")
    await until(lambda: settles.total == 2, 5.0)
    assert sleeps.waits == [0.01, 0.02, 0.04, 0.01]


@pytest.mark.parametrize(
    "error",
    [EngineUnavailable("engine away"), TimeoutError("slow"), ConnectionRefusedError(111, "no"),
     OSError("disk")],
    ids=lambda e: type(e).__name__,
)
async def test_other_not_committed_errors_are_retried_and_never_rejected(
    make_gatherer: Callable[..., Gatherer], until: Until, error: Exception,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "webhooks.gatherer")
    tries = MAX_UNEXPECTED_FAILURES + 2
    accept = FakeAccept([error] * tries)
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=1, retry_delay=0.005, max_retry_delay=0.01)
    add(gatherer, settles, "a")
    await until(lambda: settles.total == 1, 5.0)
    assert len(accept.calls) == tries + 1
    assert all(call == message("a") for call in accept.calls)  # never a rejection
    assert len(warnings_of(caplog)) == tries


async def test_an_accept_that_overruns_accept_timeout_is_retried(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept()
    accept.hang = 10.0
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=1, accept_timeout=0.1)
    add(gatherer, settles, "a")
    await until(lambda: settles.total == 1, 5.0)
    assert [ids(call) for call in accept.calls] == [["a:0"], ["a:0"]]
    assert accept.call_times[1] - accept.call_times[0] >= 0.1
    assert settles.early == []
    assert gatherer.stats["commit_failures"] == 1


# unexpected failures --------------------------------------------------------------------------


async def test_repeated_unexpected_failures_record_the_group_as_rejected(
    make_gatherer: Callable[..., Gatherer], until: Until, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "webhooks.gatherer")
    accept = FakeAccept([RuntimeError("boom")] * MAX_UNEXPECTED_FAILURES)
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=3, retry_delay=0.005)
    originals = add(gatherer, settles, "a", 2, excerpt=b"first bytes") + add(gatherer, settles,
                                                                              "b")
    await until(lambda: settles.total == 2, 5.0)
    await asyncio.sleep(0.05)
    assert MAX_UNEXPECTED_FAILURES == 3
    assert len(accept.calls) == 4
    assert all(call == originals for call in accept.calls[:3])
    rejection = accept.calls[3]
    assert ids(rejection) == ["a:0", "a:1", "b:0"]
    for item, original in zip(rejection, originals, strict=True):
        assert item.problem is not None
        assert item.problem.code == "internal_error"
        assert "could not be committed: RuntimeError: boom" in str(item.problem)
        assert item.event == EventIn("?", None)
        assert item.excerpt == original.excerpt
    assert settles.counts == {"a": 1, "b": 1}
    assert settles.early == []
    assert len(warnings_of(caplog)) == 2  # the first two tries; the third is an error line
    assert any(r.levelno == logging.ERROR and "recorded 3 events as rejected" in r.getMessage()
               for r in caplog.records)


async def test_an_expected_failure_resets_the_unexpected_count(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept([RuntimeError("a"), RuntimeError("b"), StoreUnavailable("down"),
                         RuntimeError("c"), RuntimeError("d")])
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=1, retry_delay=0.005)
    add(gatherer, settles, "a")
    await until(lambda: settles.total == 1, 5.0)
    assert len(accept.calls) == 6
    assert all(call == message("a") for call in accept.calls)  # no rejection among them


async def test_a_rejection_that_fails_too_keeps_the_group(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    accept = FakeAccept([RuntimeError("boom")] * (MAX_UNEXPECTED_FAILURES + 1))
    settles = Settles(accept)
    gatherer = make_gatherer(accept, gather_size=1, retry_delay=0.005)
    add(gatherer, settles, "a")
    await until(lambda: settles.total == 1, 5.0)
    assert len(accept.calls) == 5
    assert accept.calls[3][0].problem is not None  # the rejection, which failed
    assert accept.calls[3][0].problem.code == "internal_error"
    assert accept.calls[4] == message("a")  # the group itself, tried again, landed
    assert settles.counts == {"a": 1}
    assert settles.early == []


# close -------------------------------------------------------------------------------------------


async def test_close_leaves_what_was_never_committed_unsettled(
    until: Until
) -> None:
    accept = FakeAccept([StoreUnavailable("down")] * 1000)
    settles = Settles(accept)
    gatherer = Gatherer(GatherConfig(**{**DEFAULTS, "gather_size": 1}), accept)
    gatherer.start()
    add(gatherer, settles, "a")
    add(gatherer, settles, "b")
    await until(lambda: len(accept.calls) >= 3, 5.0)
    await gatherer.close()
    calls = len(accept.calls)
    await asyncio.sleep(0.1)
    assert len(accept.calls) == calls  # stopped
    assert settles.total == 0


async def test_close_while_gathering_commits_nothing() -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = Gatherer(GatherConfig(**{**DEFAULTS, "gather_size": 10,
                                        "gather_interval": 30.0}), accept)
    gatherer.start()
    add(gatherer, settles, "a")
    await asyncio.sleep(0.05)
    await gatherer.close()
    await asyncio.sleep(0.05)
    assert accept.calls == []
    assert settles.total == 0


async def test_close_during_a_commit_settles_nothing_of_it(until: Until) -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = Gatherer(GatherConfig(**{**DEFAULTS, "gather_size": 1}), accept)
    gatherer.start()
    add(gatherer, settles, "done")
    await until(lambda: settles.total == 1, 3.0)
    accept.gate = asyncio.Event()
    add(gatherer, settles, "cut")
    await until(lambda: len(accept.calls) == 2, 3.0)
    await gatherer.close()
    accept.gate.set()
    await asyncio.sleep(0.05)
    assert settles.counts == {"done": 1}


# bugs --------------------------------------------------------------------------------------------


async def test_a_settle_that_raises_does_not_stop_the_gatherer(until: Until) -> None:
    accept = FakeAccept()
    settles = Settles(accept)
    gatherer = Gatherer(GatherConfig(**{**DEFAULTS, "gather_size": 2}), accept)
    gatherer.start()

    def bad_settle() -> None:
        raise RuntimeError("ack failed")

    try:
        gatherer.add(message("bad"), bad_settle)
        add(gatherer, settles, "a")
        await until(lambda: len(accept.calls) == 1, 3.0)
        add(gatherer, settles, "b")
        add(gatherer, settles, "c")
        await until(lambda: settles.total == 3, 2.0)
        assert settles.counts == {"a": 1, "b": 1, "c": 1}
    finally:
        with contextlib.suppress(RuntimeError):  # today close() re-raises the settle's error
            await gatherer.close()


async def test_each_message_is_settled_with_its_own_part_of_the_commit(
    make_gatherer: Callable[..., Gatherer], until: Until
) -> None:
    """One commit for the group; each message learns what its own events became."""
    accept = FakeAccept()
    gatherer = make_gatherer(accept, gather_size=10)
    settles = Settles(accept)
    add(gatherer, settles, "a")
    add(gatherer, settles, "b", 3)
    await until(lambda: settles.total == 2, 3.0)
    assert len(accept.calls) == 1
    assert settles.parts["a"].accepted == ["a:0"]
    assert settles.parts["b"].accepted == ["b:0", "b:1", "b:2"]
    assert settles.parts["b"].duplicates == 0
