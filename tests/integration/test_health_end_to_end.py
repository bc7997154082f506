"""End to end, per endpoint: circuit breaker, shared rate limit, automatic disable, v1a
signatures, static headers and secret rotation, through real worker processes."""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature as BadEd25519Signature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.integration.conftest import ROOT, WorkerProcess, serving, wait_until, worker_env
from worker.cli_support import with_store as cli_with_store
from worker.core.errors import InvalidSignature
from worker.core.models import Endpoint, EndpointPolicy
from worker.core.signing import generate_secret, generate_signing_key, public_key_of, verify
from worker.db.connection import create_engine
from worker.db.schema import attempts, deliveries
from worker.db.store import Store
from worker.settings import Settings

pytestmark = pytest.mark.timeout(180)
T = TypeVar("T")


# -- a receiver whose answers are scripted per path ------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.time() on arrival
    status: int  # what was answered


@dataclass
class ScriptedReceiver:
    """Answers `fail_first[path]` requests to a path with 500, then `status[path]` (200)."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _counts: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        with self.lock:
            self._counts[path] += 1
            if self._counts[path] <= self.fail_first.get(path, 0):
                status = 500
            else:
                status = self.status.get(path, 200)
            self.hits.append(Hit(path, {k.lower(): v for k, v in request.headers.items()},
                                 body, time.time(), status))
        return web.Response(status=status, text="ok" if status < 300 else "not now")


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedReceiver]:
    state = ScriptedReceiver()
    with serving(state.handle, "health-receiver") as state.port:
        yield state


# -- database helpers ------------------------------------------------------------------------


def with_store(database_url: str, work: Callable[[Store], Awaitable[T]]) -> T:
    return cli_with_store(Settings(database_url=database_url), work)


def add(database_url: str, endpoint_id: str, url: str, *secrets: str,
        policy: EndpointPolicy | None = None) -> Endpoint:
    endpoint = Endpoint(id=endpoint_id, url=url, secrets=secrets or (generate_secret(),),
                        policy=policy or EndpointPolicy())
    return with_store(database_url, lambda s: s.add_endpoint(endpoint))


def get(database_url: str, endpoint_id: str) -> Endpoint:
    return with_store(database_url, lambda s: s.get_endpoint(endpoint_id))


def run_db(database_url: str, query: Callable[[Any], Awaitable[T]]) -> T:
    async def go() -> T:
        engine = create_engine(Settings(database_url=database_url))
        try:
            async with engine.connect() as conn:
                return await query(conn)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def status_counts(database_url: str, endpoint_id: str) -> Counter[str]:
    async def q(conn: Any) -> Counter[str]:
        rows = await conn.execute(
            select(deliveries.c.status, func.count())
            .where(deliveries.c.endpoint_id == endpoint_id)
            .group_by(deliveries.c.status))
        return Counter({status: count for status, count in rows})

    return run_db(database_url, q)


def attempt_rows(database_url: str, endpoint_id: str) -> list[Any]:
    """The endpoint's attempts, oldest first."""

    async def q(conn: Any) -> list[Any]:
        rows = await conn.execute(
            select(attempts)
            .join(deliveries, deliveries.c.id == attempts.c.delivery_id)
            .where(deliveries.c.endpoint_id == endpoint_id)
            .order_by(attempts.c.attempted_at))
        return list(rows)

    return run_db(database_url, q)


def log_lines(worker: WorkerProcess, *needles: str) -> list[str]:
    return [line for line in worker.log().splitlines() if all(n in line for n in needles)]


def level_of(line: str) -> str:
    """The level of a worker log line (`<date> <time> LEVEL logger: message`)."""
    return line.split()[2]


def engine_stats(worker: WorkerProcess) -> dict[str, int]:
    """The counters of the worker's last "engine stopped" line (after `worker.stop()`)."""
    lines = log_lines(worker, "engine stopped:")
    assert lines, "no 'engine stopped' line in the worker log"
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", lines[-1])}


# -- 1. circuit breaker ----------------------------------------------------------------------


def test_circuit_opens_probes_once_per_cooldown_and_closes_without_dropping(
    database_url: str, scripted: ScriptedReceiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event, deliver_webhook_events

    stamp = time.time_ns()
    events, cooldown = 10, 2.0
    failing = f"/breaker-{stamp}"
    healthy = f"/healthy-{stamp}"
    # The first wave (one attempt per event) fails, then two probes fail, the third succeeds.
    scripted.fail_first[failing] = events + 2
    flaky = add(database_url, "ep-breaker", scripted.url(failing))
    fine = add(database_url, "ep-fine", scripted.url(healthy))
    worker = start_worker(database_url, WEBHOOKS_BREAKER_FAILURES="3",
                          WEBHOOKS_BREAKER_COOLDOWN=str(cooldown),
                          WEBHOOKS_RETRY_SCHEDULE="1,1,1,1,1")

    # One message: every first attempt is in flight before the circuit can open.
    deliver_webhook_events.delay(events=[
        {"webhook_id": flaky.id, "event_data": {"type": "t", "n": n}} for n in range(events)])
    for n in range(10):
        deliver_webhook_event.delay(webhook_id=fine.id, event_data={"type": "t", "n": n})
    wait_until(lambda: log_lines(worker, "webhooks.health", "circuit open endpoint=ep-breaker"),
               20, "the circuit to open")

    # While the circuit is open, a healthy endpoint's events go straight through.
    sent_at: dict[int, float] = {}
    for n in range(10, 20):
        sent_at[n] = time.time()
        deliver_webhook_event.delay(webhook_id=fine.id, event_data={"type": "t", "n": n})
    wait_until(lambda: len(scripted.to(healthy)) >= 20, 20, "20 healthy deliveries")
    for hit in scripted.to(healthy):
        n = int(hit.body.decode().split('"n":')[1].rstrip("}"))
        if n in sent_at:
            assert hit.at - sent_at[n] < 1.0, f"healthy event {n} took {hit.at - sent_at[n]:.2f}s"
    assert get(database_url, flaky.id).circuit_open_until is not None  # still open then

    wait_until(lambda: status_counts(database_url, flaky.id)["succeeded"] == events, 40,
               f"all {events} deliveries to the recovering endpoint")
    wait_until(lambda: log_lines(worker, "webhooks.health", "circuit closed endpoint=ep-breaker"),
               10, "the circuit to close")
    assert status_counts(database_url, flaky.id) == Counter({"succeeded": events})
    wait_until(lambda: status_counts(database_url, fine.id)["succeeded"] == 20, 10, "healthy")
    assert status_counts(database_url, fine.id) == Counter({"succeeded": 20})
    assert {r.attempt_number for r in attempt_rows(database_url, fine.id)} == {1}

    opened = log_lines(worker, "circuit open endpoint=ep-breaker")
    assert opened and {level_of(line) for line in opened} == {"ERROR"}
    closed = log_lines(worker, "circuit closed endpoint=ep-breaker")
    assert len(closed) == 1

    # The receiver saw: the first wave, two failed probes, the successful probe, the rest.
    hits = scripted.to(failing)
    assert [h.status for h in hits] == [500] * (events + 2) + [200] * events
    wave, probes, rest = hits[:events], hits[events:events + 3], hits[events + 3:]
    assert wave[-1].at - wave[0].at < 1.0
    gaps = [b.at - a.at for a, b in zip([wave[-1], *probes], probes, strict=False)]
    # Without the breaker the retries would come 1 s after each failure (the schedule).
    assert all(g >= cooldown * 0.9 for g in gaps), f"probes came {gaps} s apart"
    assert all(g < cooldown + 2.0 for g in gaps), f"probes came {gaps} s apart"
    # Once a probe succeeds, what waited goes at once.
    assert rest[-1].at - probes[-1].at < 2.0

    # The attempt rows say the same: nothing inside an open window but the one probe.
    rows = attempt_rows(database_url, flaky.id)
    assert len(rows) == 2 * events + 2
    assert [(r.status_code, r.outcome) for r in rows] == (
        [(500, "retry")] * (events + 2) + [(200, "success")] * events)
    times = [r.attempted_at.timestamp() for r in rows]
    first_wave_end = times[events - 1]
    probe_times = times[events:events + 3]
    in_window = [t for t in times if first_wave_end < t < probe_times[0]]
    assert in_window == []
    row_gaps = [b - a for a, b in zip([first_wave_end, *probe_times], probe_times, strict=False)]
    assert all(g >= cooldown * 0.9 for g in row_gaps), row_gaps
    per_delivery = Counter(r.delivery_id for r in rows)
    assert len(per_delivery) == events and max(per_delivery.values()) <= 6


# -- 2. a rate limit shared by two worker processes ------------------------------------------


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_rate_limit_holds_across_two_workers(
    database_url: str, scripted: ScriptedReceiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    rate, burst, total = 20, 2, 120
    path = f"/rate-{time.time_ns()}"
    ep = add(database_url, "ep-rate", scripted.url(path),
             policy=EndpointPolicy(rate_limit=rate, rate_burst=burst))
    # Leases outlast the run: a lease expiring in the throttle queue is another test's subject.
    workers = [start_worker(database_url, WEBHOOKS_LEASE_SECONDS="30"),
               start_worker(database_url, WEBHOOKS_LEASE_SECONDS="30")]

    started = time.time()
    for n in range(total):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})
    wait_until(lambda: len(scripted.to(path)) >= total, 60, f"{total} rate-limited deliveries")
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == total, 20, "recorded")
    time.sleep(0.5)  # room for a duplicate to show up

    hits = scripted.to(path)
    assert len(hits) == total
    assert len({h.headers["webhook-id"] for h in hits}) == total
    assert status_counts(database_url, ep.id) == Counter({"succeeded": total})
    arrivals = sorted(h.at for h in hits)
    # The steady state: leave out the opening burst.
    steady = arrivals[burst + 3:]
    measured = (len(steady) - 1) / (steady[-1] - steady[0])
    print(f"\nrate limit {rate}/s across 2 workers: measured {measured:.1f}/s "
          f"({total} in {arrivals[-1] - started:.2f}s from the first .delay())")
    assert abs(measured - rate) <= 0.10 * rate, f"measured {measured:.1f}/s for a limit of {rate}"
    # Nowhere more than a second's worth plus the burst within one second.
    busiest = max(sum(1 for t in arrivals if a <= t < a + 1.0) for a in arrivals)
    assert busiest <= rate + burst, f"{busiest} deliveries within one second"

    # Both processes delivered, each its own share, from the one shared bucket.
    sent_by = []
    for worker in workers:
        ids = set()
        for line in log_lines(worker, "webhooks.attempts", "endpoint=ep-rate", "outcome=success"):
            match = re.search(r"delivery=(\S+)", line)
            assert match is not None, line
            ids.add(match.group(1))
        sent_by.append(ids)
        assert "rate limit store unavailable" not in worker.log()
    print(f"deliveries per worker: {[len(ids) for ids in sent_by]}")
    assert all(sent_by), f"a worker sent nothing: {[len(ids) for ids in sent_by]}"
    assert not sent_by[0] & sent_by[1]
    assert sent_by[0] | sent_by[1] == {h.headers["webhook-id"] for h in hits}

    for worker in workers:
        worker.stop()
    for worker in workers:
        stats = engine_stats(worker)
        assert stats["lease_lost"] == 0, stats


# -- 2b. a throttled backlog that outlasts its leases -------------------------------------------


class RateLostToExpiredLeases(AssertionError):
    """Tokens went to deliveries whose lease had expired while they waited for one."""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rate_limited_backlog_longer_than_the_lease_keeps_its_rate(
    database_url: str, scripted: ScriptedReceiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    # 10 s of work at the limit, with the test environment's 6 s lease (in production: 120 s,
    # and park_limit keeps up to 500 in memory, so any backlog over 120 s x the rate).
    rate, total = 10, 100
    path = f"/backlog-{time.time_ns()}"
    ep = add(database_url, "ep-backlog", scripted.url(path),
             policy=EndpointPolicy(rate_limit=rate, rate_burst=1))
    worker = start_worker(database_url)
    for n in range(total):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})
    wait_until(lambda: len(scripted.to(path)) >= total, 60, f"{total} deliveries")
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == total, 20, "recorded")
    time.sleep(0.5)
    hits = scripted.to(path)
    assert len(hits) == total and len({h.headers["webhook-id"] for h in hits}) == total
    worker.stop()
    stats = engine_stats(worker)
    arrivals = sorted(h.at for h in hits)
    measured = (len(arrivals) - 3) / (arrivals[-1] - arrivals[2])
    print(f"\nrate limit {rate}/s, {total} queued, 6 s lease: measured {measured:.1f}/s, "
          f"{stats['lease_lost']} tokens taken by expired leases")
    if abs(measured - rate) > 0.10 * rate:
        raise RateLostToExpiredLeases(
            f"measured {measured:.1f}/s for a limit of {rate}/s; lease_lost={stats['lease_lost']}")


# -- 3. automatic disable, held deliveries, enable -------------------------------------------


def test_an_endpoint_failing_for_long_is_disabled_and_enabling_sends_what_was_held(
    database_url: str, scripted: ScriptedReceiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    path = f"/down-{time.time_ns()}"
    scripted.status[path] = 500
    ep = add(database_url, "ep-down", scripted.url(path))
    worker = start_worker(database_url, WEBHOOKS_DISABLE_AFTER="3",
                          WEBHOOKS_RETRY_SCHEDULE="1,1,1,1,1,1,1,1")
    deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": 0})

    wait_until(lambda: not get(database_url, ep.id).enabled, 30, "the endpoint to be disabled")
    state = get(database_url, ep.id)
    assert state.disabled_reason is not None
    assert "disabled automatically" in state.disabled_reason
    assert "failures since" in state.disabled_reason
    disabled = wait_until(lambda: log_lines(worker, "webhooks.health",
                                            "endpoint disabled endpoint=ep-down"),
                          10, "the 'endpoint disabled' line")
    assert [level_of(line) for line in disabled] == ["ERROR"]
    hits = scripted.to(path)
    assert {h.status for h in hits} == {500}
    # Disabled once failures had lasted 3 s: by the last try, not by the one before it.
    tried = [r.attempted_at.timestamp() for r in attempt_rows(database_url, ep.id)]
    assert len(tried) == len(hits) >= 3
    assert tried[-2] - tried[0] < 3.0 <= tried[-1] - tried[0] + 0.2, tried

    # The first delivery is held once its next try comes due; a new event is held at once.
    wait_until(lambda: status_counts(database_url, ep.id)["held"] == 1, 10, "first held")
    deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": 1})
    wait_until(lambda: status_counts(database_url, ep.id)["held"] == 2, 10, "second held")
    time.sleep(1.5)
    assert len(scripted.to(path)) == len(hits)  # nothing attempted while disabled

    scripted.status[path] = 200
    enable = subprocess.run(
        [sys.executable, "-m", "worker.cli", "endpoints", "enable", ep.id],
        env=worker_env(database_url), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert enable.returncode == 0, enable.stderr
    assert "2 held deliveries resumed" in enable.stdout
    assert get(database_url, ep.id).enabled

    # The same worker that saw the endpoint disabled sends them (its own brief gate lapses).
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 2, 15,
               "the held deliveries to arrive after the endpoint was enabled")
    arrived = [h for h in scripted.to(path) if h.status == 200]
    assert sorted(int(h.body.decode().split('"n":')[1].rstrip("}")) for h in arrived) == [0, 1]
    assert status_counts(database_url, ep.id) == Counter({"succeeded": 2})
    fresh = get(database_url, ep.id)
    assert fresh.failure_streak == 0 and fresh.failing_since is None


# -- 4. v1a (Ed25519) beside v1 ---------------------------------------------------------------


def test_v1_and_v1a_signatures_verify_with_independent_code(
    database_url: str, scripted: ScriptedReceiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    path = f"/v1a-{time.time_ns()}"
    secret = generate_secret()
    signing_key, public_key = generate_signing_key()
    assert public_key_of(signing_key) == public_key
    ep = add(database_url, "ep-v1a", scripted.url(path), secret, signing_key)
    start_worker(database_url)
    for n in range(5):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})
    wait_until(lambda: len(scripted.to(path)) >= 5, 30, "five deliveries")

    raw_public = base64.b64decode(public_key.removeprefix("whpk_"), validate=True)
    ed25519 = Ed25519PublicKey.from_public_bytes(raw_public)
    _, other_public = generate_signing_key()
    for hit in scripted.to(path):
        entries = hit.headers["webhook-signature"].split(" ")
        assert [e.split(",", 1)[0] for e in entries] == ["v1", "v1a"]
        # v1 with the reference library (which skips entries it does not know).
        StandardWebhook(secret).verify(hit.body, hit.headers)
        # v1a straight with `cryptography`, over "id.timestamp.body".
        content = (f"{hit.headers['webhook-id']}.{hit.headers['webhook-timestamp']}.".encode()
                   + hit.body)
        signature = base64.b64decode(entries[1].split(",", 1)[1], validate=True)
        ed25519.verify(signature, content)
        with pytest.raises(BadEd25519Signature):
            ed25519.verify(signature, content + b" ")
        # And with the project's own receiver-side check, public key only.
        verify(public_key, hit.headers, hit.body)
        with pytest.raises(InvalidSignature):
            verify(other_public, hit.headers, hit.body)
        with pytest.raises(InvalidSignature):
            verify(public_key, hit.headers, hit.body + b" ")
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 5, 10, "recorded")


# -- 5. static header, and rotating the secret while the worker runs -------------------------


def test_static_header_on_every_request_and_rotation_without_overlap(
    database_url: str, scripted: ScriptedReceiver, start_worker: Any
) -> None:
    from worker.tasks.webhook_delivery import deliver_webhook_event

    path = f"/rotate-{time.time_ns()}"
    old, new = generate_secret(), generate_secret()
    ep = add(database_url, "ep-rotate", scripted.url(path), old,
             policy=EndpointPolicy(headers=(("X-Api-Key", "k-123"),)))
    start_worker(database_url)
    for n in range(5):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})
    wait_until(lambda: len(scripted.to(path)) >= 5, 30, "five deliveries before the rotation")
    before = scripted.to(path)
    for hit in before:
        assert hit.headers["x-api-key"] == "k-123"
        StandardWebhook(old).verify(hit.body, hit.headers)
        with pytest.raises(WebhookVerificationError):
            StandardWebhook(new).verify(hit.body, hit.headers)

    rotated = with_store(database_url,
                         lambda s: s.rotate_secret(ep.id, new, overlap_seconds=0))
    assert rotated.secrets == (new,)
    assert rotated.policy.headers == (("X-Api-Key", "k-123"),)  # kept by the rotation

    for n in range(5, 10):
        deliver_webhook_event.delay(webhook_id=ep.id, event_data={"type": "t", "n": n})
    wait_until(lambda: len(scripted.to(path)) >= 10, 30, "five deliveries after the rotation")
    after = scripted.to(path)[5:]
    assert len(after) == 5
    for hit in after:
        assert hit.headers["x-api-key"] == "k-123"
        assert len(hit.headers["webhook-signature"].split(" ")) == 1
        StandardWebhook(new).verify(hit.body, hit.headers)
        with pytest.raises(WebhookVerificationError):
            StandardWebhook(old).verify(hit.body, hit.headers)
    wait_until(lambda: status_counts(database_url, ep.id)["succeeded"] == 10, 10, "recorded")


