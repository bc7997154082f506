"""Smoke test of bench/run.py: a tiny --quick run of the engine and one Celery mode."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
MODE_FIELDS = {
    "mode", "label", "deliveries_per_s", "enqueue_rate", "p50_ms", "p95_ms", "p99_ms",
    "peak_rss_mb", "cpu_per_1k", "ledger", "ratio_baseline", "ratio_celery_noop",
    "ratio_engine", "series", "receiver_busy",
}


def _redis_up() -> bool:
    host, port = TEST_REDIS_URL.removeprefix("redis://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _run(tmp_path: Path, modes: str) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "run.py"), "--compare", "--modes", modes,
        "--quick", "--events", "300", "--duration", "2", "--warmup", "50",
        "--producers", "1", "--workers", "1", "--no-half-rate",
        "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'webhooks_bench.db'}",
        "--redis-url", f"{TEST_REDIS_URL}/13", "--json", str(out),
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 90
    assert "targets (issue 4)" in proc.stdout
    data: dict = json.loads(out.read_text())  # type: ignore[type-arg]
    return data


def test_quick_engine_and_single(tmp_path: Path) -> None:
    if importlib.util.find_spec("worker.delivery.standalone") is None:
        pytest.skip("worker.delivery.standalone is not there yet")
    if not _redis_up():
        pytest.skip("needs the tests' own Redis (the single mode's broker)")
    data = _run(tmp_path, "engine,single")
    assert data["run"]["receiver_capacity"] > 0
    assert [m["label"] for m in data["modes"]] == ["engine", "single"]
    for m in data["modes"]:
        assert set(m) >= MODE_FIELDS, MODE_FIELDS - set(m)
        led = m["ledger"]
        assert led["balanced"], led["problems"]
        assert led["published"] > 0
        assert led["published"] == led["delivered"] + led["failed"] + led["missing"]
        assert m["deliveries_per_s"] > 0
    single = data["modes"][1]
    assert single["db_status"]["succeeded"] == single["ledger"]["delivered"]
    assert {t["status"] for t in data["targets"]} <= {"met", "missed", "n/a", "void"}
