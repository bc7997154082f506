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


def test_beat_runs_the_sweep_within_seconds_and_cleanup_daily() -> None:
    schedule = {entry["task"]: entry["schedule"] for entry in app.conf.beat_schedule.values()}
    assert schedule["webhooks.retry_failed_deliveries"] <= 5.0
    assert schedule["webhooks.cleanup_old_deliveries"] == 86400.0


def test_only_json_crosses_the_broker() -> None:
    assert app.conf.task_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
