"""The Celery app: task names, the original setup's limits, redelivery safety."""

from __future__ import annotations

from worker.celery_app import app, settings

TASKS = {
    "webhooks.deliver_event",
    "webhooks.deliver_events",
    "webhooks.publish_event",
    "webhooks.retry_failed_deliveries",
    "webhooks.cleanup_old_deliveries",
}


def test_the_fixed_task_names_are_registered() -> None:
    app.loader.import_default_modules()
    assert set(app.tasks) >= TASKS


def test_limits_and_acknowledgement_follow_the_original_setup() -> None:
    conf = app.conf
    assert (conf.task_time_limit, conf.task_soft_time_limit) == (300, 240)
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_max_tasks_per_child == 1000
    assert conf.worker_concurrency == 4
    assert conf.broker_connection_retry_on_startup is True


def test_visibility_timeout_exceeds_the_hard_limit_for_broker_and_backend() -> None:
    conf = app.conf
    broker = conf.broker_transport_options["visibility_timeout"]
    backend = conf.result_backend_transport_options["visibility_timeout"]
    assert broker == backend == settings.visibility_timeout
    assert broker > conf.task_time_limit


def test_prefetch_leaves_room_to_gather() -> None:
    assert app.conf.worker_prefetch_multiplier > settings.gather_size


def test_beat_runs_the_safety_net_sweep_every_5_minutes_and_cleanup_daily() -> None:
    """As in the original setup; each engine claims its due retries itself in between."""
    schedule = {entry["task"]: entry["schedule"] for entry in app.conf.beat_schedule.values()}
    assert schedule["webhooks.retry_failed_deliveries"] == settings.sweep_interval == 300.0
    assert schedule["webhooks.cleanup_old_deliveries"] == 86400.0
    assert settings.claim_interval > 0


def test_only_json_crosses_the_broker() -> None:
    assert app.conf.task_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]


# -- fail fast, in one line ----------------------------------------------------------------------


def _start_worker(tmp_path, keys: bool = True, **env_overrides: str):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKS_")}
    from tests.conftest import TEST_BROKER_URL

    env.update(PYTHONPATH=str(root), CELERY_BROKER_URL=TEST_BROKER_URL,
               **env_overrides)
    if keys:
        env["WEBHOOKS_SECRET_KEYS"] = os.environ["WEBHOOKS_SECRET_KEYS"]
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
         "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_a_worker_on_an_unmigrated_database_exits_78_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = _start_worker(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}")
    assert done.returncode == 78
    lines = [line for line in done.stderr.splitlines() if line.startswith("webhooks: ")]
    assert len(lines) == 1, done.stderr
    assert "is not migrated" in lines[0] and "webhooks db upgrade" in lines[0]
    assert "Traceback" not in done.stderr


def test_a_worker_without_a_key_on_postgresql_exits_78_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = _start_worker(tmp_path, keys=False,
                         DATABASE_URL="postgresql://postgres@127.0.0.1:5432/postgres")
    assert done.returncode == 78
    lines = [line for line in done.stderr.splitlines() if line.startswith("webhooks: ")]
    assert len(lines) == 1 and "webhooks keys generate" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
