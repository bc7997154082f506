"""Endpoints that are not well-behaved HTTP servers: the worker stays up and responsive,
each bad endpoint's deliveries end `failed` with recorded attempts, the good one's arrive."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.conftest import StartWorker
from tests.reliability.harness import Database, Producer, new_secret, wait_until
from tests.reliability.ledger import Ledger
from tests.reliability.servers import BAD_KINDS, BadServers, Receiver

pytestmark = pytest.mark.timeout(150)

SCHEDULE = (1, 1)
REQUEST_TIMEOUT = 2.0
PER_BAD = 3
WAVES, PER_WAVE = 4, 10
WAVE_LATENCY = 5.0  # seconds a good event may take while the bad ones churn
MAX_RSS_MB = 600
# What each kind of misbehaviour may be recorded as.
EXPECTED_KINDS = {
    "endless-body": {"http_status", "protocol", "timeout"},  # a 500 whose body never ends
    "huge-headers": {"protocol"},
    "silent": {"timeout"},
    "drip": {"timeout"},
    "close-mid-body": {"protocol"},
    "garbage": {"protocol"},
}


def test_misbehaving_http_servers_fail_visibly_while_the_good_endpoint_flows(
    start_worker: StartWorker, producer: Producer, receiver: Receiver, database: Database,
    bad_servers: BadServers, endpoints: Callable[[dict[str, str]], None],
    make_ledger: Callable[[str, str], Ledger],
) -> None:
    assert set(EXPECTED_KINDS) == set(BAD_KINDS)
    ledger = make_ledger(
        "bad-http-servers",
        "endpoints that stream an endless body, send 1 MiB of headers, never answer, drip a "
        "byte a second, close mid-body, answer garbage; plus one good endpoint")
    endpoints({"ep-good": "ok"})
    database.add_endpoints([(f"ep-{kind}", bad_servers.url(kind), new_secret())
                            for kind in BAD_KINDS])
    worker = start_worker(
        WEBHOOKS_RETRY_SCHEDULE=",".join(map(str, SCHEDULE)), WEBHOOKS_RETRY_JITTER="0",
        WEBHOOKS_SWEEP_INTERVAL="0.5", WEBHOOKS_LEASE_SECONDS="6",
        WEBHOOKS_REQUEST_TIMEOUT=str(REQUEST_TIMEOUT), WEBHOOKS_CONNECT_TIMEOUT="2",
        WEBHOOKS_REQUEUE_DELAY="0.5")

    producer.send("single", [ledger.single(f"ep-{kind}") for kind in BAD_KINDS
                             for _ in range(PER_BAD)])
    slow_waves = []
    peak_rss = 0.0
    for wave in range(WAVES):
        calls = [ledger.single("ep-good") for _ in range(PER_WAVE)]
        sent = producer.send("single", calls)["sent"]
        ns = {c["event_data"]["n"] for c in calls}
        try:
            wait_until(lambda ns=ns: ns <= receiver.delivered_ns(), WAVE_LATENCY + 10,
                       f"wave {wave}")
        except AssertionError:
            slow_waves.append((wave, None))
        else:
            arrived = max(h.at for h in receiver.snapshot() if h.n in ns and h.delivered)
            latency = arrived - min(s["at"] for s in sent)
            if latency > WAVE_LATENCY:
                slow_waves.append((wave, round(latency, 1)))
        peak_rss = max(peak_rss, worker.rss_mb())
        time.sleep(2)

    ledger.wait_settled(receiver, database, 40)
    settled = ledger.finish(receiver, database)
    bad_ids = [f"ep-{kind}" for kind in BAD_KINDS]
    rows = database.rows(bad_ids)
    attempts = database.attempts(bad_ids)
    print(f"peak worker RSS {peak_rss:.0f} MB; bad-server connections "
          f"{dict(bad_servers.connections)}")

    assert worker.alive(), f"worker exited ({worker.returncode}):\n{worker.tail()}"
    assert not slow_waves, (
        f"good endpoint starved while bad endpoints churned (wave, seconds): {slow_waves}")
    assert peak_rss <= MAX_RSS_MB, f"worker RSS reached {peak_rss:.0f} MB"
    Ledger.assert_promise(settled, expect_failed=len(BAD_KINDS) * PER_BAD)
    for kind in BAD_KINDS:
        mine = [r for r in rows if r.endpoint_id == f"ep-{kind}"]
        assert len(mine) == PER_BAD and all(r.status == "failed" for r in mine), (
            f"{kind}: deliveries {[(r.status, r.attempts, r.last_error) for r in mine]}")
        assert all(r.attempts == len(SCHEDULE) + 1 for r in mine), (
            f"{kind}: attempts {[r.attempts for r in mine]}, expected {len(SCHEDULE) + 1}")
        tried = [a for a in attempts if a["endpoint_id"] == f"ep-{kind}"]
        assert len(tried) == PER_BAD * (len(SCHEDULE) + 1), f"{kind}: {len(tried)} attempts"
        kinds = {a["error_kind"] for a in tried}
        assert kinds <= EXPECTED_KINDS[kind], (
            f"{kind}: recorded error kinds {kinds}, expected within {EXPECTED_KINDS[kind]}; "
            f"errors {[a['error'] for a in tried][:2]}")
        assert all(a["outcome"] != "success" for a in tried)
        slowest = max(a["duration_ms"] for a in tried)
        assert slowest <= (REQUEST_TIMEOUT + 1.5) * 1000, (
            f"{kind}: an attempt took {slowest:.0f} ms, past the {REQUEST_TIMEOUT}s timeout")
