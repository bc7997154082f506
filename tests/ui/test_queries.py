"""worker.ui.queries on SQLite and PostgreSQL: endpoint health from bounded samples."""

from __future__ import annotations

from datetime import timedelta

from tests.ui.conftest import T0, Ui
from worker.ui import queries as queries_module
from worker.ui.queries import UiQueries


async def test_health_of_endpoints_matches_one_query_each_and_is_bounded(
        ui: Ui, monkeypatch: object) -> None:
    q = UiQueries(ui.store.engine, ui.store.keys)
    for endpoint_id in ("ep-a", "ep-b", "ep-idle"):
        await ui.add_endpoint(endpoint_id)
    # ep-a: 4 deliveries, the newest failing (500 after 30 ms), the rest succeeding (10 ms).
    for n in range(4):
        newest = n == 3
        await ui.add_delivery(f"msg_a{n}", "ep-a", status="failed" if newest else "succeeded",
                              created_at=T0 + timedelta(minutes=n), tried=[{
                                  "outcome": "failed" if newest else "success",
                                  "status_code": 500 if newest else 200,
                                  "duration_ms": 30.0 if newest else 10.0,
                                  "error": "HTTP 500" if newest else None}])
    # Only each endpoint's newest 3 deliveries count.
    monkeypatch.setattr(queries_module, "HEALTH_DELIVERIES", 3)  # type: ignore[attr-defined]
    for n in range(5):
        await ui.add_delivery(f"msg_b{n}", "ep-b", status="succeeded",
                              created_at=T0 + timedelta(minutes=n),
                              tried=[{"outcome": "success", "status_code": 200,
                                      "duration_ms": 100.0 * (n + 1), "error": None}])
    together = await q.health_of_endpoints(["ep-a", "ep-b", "ep-idle"])
    for endpoint_id in ("ep-a", "ep-b", "ep-idle"):
        assert together[endpoint_id] == await q.endpoint_health(endpoint_id), endpoint_id
    a, b, idle = together["ep-a"], together["ep-b"], together["ep-idle"]
    assert (a.attempts, a.last_status, a.last_outcome) == (3, 500, "failed")  # msg_a1..a3
    assert a.success_ratio is not None and round(a.success_ratio, 3) == 0.667
    assert (a.p50_ms, a.p99_ms) == (10.0, 30.0)
    assert b.attempts == 3 and b.p50_ms == 400.0 and b.p99_ms == 500.0  # msg_b2..msg_b4
    assert idle.attempts == 0 and idle.success_ratio is None
    assert await q.health_of_endpoints([]) == {}
