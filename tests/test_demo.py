"""The Quickstart's main command, as a user runs it (with a small event count)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_BROKER_URL


@pytest.mark.timeout(120)
def test_webhooks_demo_delivers_end_to_end(tmp_path: Path, redis_clean: None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKS_")}
    env.update(CELERY_BROKER_URL=TEST_BROKER_URL,
               DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}")
    done = subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--events", "50"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "50/50 events at /ok" in done.stdout
    assert "10/10 at /flaky (10 retried after a 503, same webhook-id)" in done.stdout
    assert "signatures verified: 70, bad: 0" in done.stdout
    assert "succeeded 60" in done.stdout


def test_demo_says_clearly_when_redis_is_not_there(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKS_")}
    env.update(CELERY_BROKER_URL="redis://127.0.0.1:1/0",
               DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}")
    done = subprocess.run([sys.executable, "-m", "worker.cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "is not reachable" in done.stderr and "start it" in done.stderr
