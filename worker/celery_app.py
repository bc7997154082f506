"""The Celery application: `celery -A worker.celery_app worker|beat`."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker import logs
from worker.settings import get_settings
from worker.transport import TRANSPORT

settings = get_settings()

app = Celery("webhooks", include=["worker.tasks.webhook_delivery"])
_transport = {"visibility_timeout": settings.visibility_timeout}
app.conf.update(
    broker_url=settings.broker_url,
    # Kombu's Redis transport, hardened against what it may find on the queue.
    broker_transport=TRANSPORT if settings.broker_url.startswith("redis://") else None,
    # Without a backend, .get() says which setting to configure (Celery's own error does
    # not); results are not ignored, or .get() would return None without a word.
    result_backend=settings.result_backend or "worker.monitoring:NoResultBackend",
    task_ignore_result=False,
    # Task events for Flower and celery-exporter; single events send theirs from the
    # consumer (worker.monitoring), as Celery never runs them as tasks.
    worker_send_task_events=settings.task_events,
    task_send_sent_event=settings.task_sent_events,
    # Above the hard time limit, so no running task is handed to a second worker.
    broker_transport_options=_transport,
    result_backend_transport_options=_transport,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    task_time_limit=settings.task_time_limit,
    task_soft_time_limit=settings.task_soft_time_limit,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_max_tasks_per_child=settings.max_tasks_per_child,
    worker_concurrency=settings.concurrency,
    # Gathering needs many unacknowledged messages in hand: prefetch must exceed the gather
    # size.
    worker_prefetch_multiplier=max(settings.prefetch_multiplier, settings.gather_size + 1),
    worker_hijack_root_logger=False,
    worker_soft_shutdown_timeout=settings.shutdown_grace,
    beat_schedule={
        "webhooks-retry-sweep": {
            "task": "webhooks.retry_failed_deliveries",
            "schedule": settings.sweep_interval,
            "options": {"expires": max(settings.sweep_interval, 1.0)},
        },
        "webhooks-cleanup": {
            "task": "webhooks.cleanup_old_deliveries",
            "schedule": 86400.0,
            "options": {"expires": 3600.0},
        },
    },
)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    logs.configure(settings.log_level, journal=settings.journal_stream is not None,
                   fmt=settings.log_format)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    # Best effort: leases bring back whatever a hard exit leaves in flight.
    from worker.delivery.runtime import stop_runtime

    stop_runtime()


@signals.worker_init.connect
def _check_keys(**_: Any) -> None:
    """Refuse to start, in one line, without a key to unseal endpoint secrets with or on a
    database that is not migrated; warn (once) and go on when the database is away."""
    import sys

    from worker.core.errors import KeyRingError
    from worker.db.migrate import UNAVAILABLE, SchemaProblem, check_schema
    from worker.keys import load_keyring

    try:
        load_keyring(settings)
        check_schema(settings.database_url)
    except (KeyRingError, SchemaProblem) as exc:
        print(f"webhooks: error: {exc}", file=sys.stderr)
        raise SystemExit(78) from None  # EX_CONFIG: systemd does not restart into it
    except (*UNAVAILABLE, TimeoutError) as exc:
        # Not fatal: messages wait in the broker, and the engine writes once it answers.
        print(f"webhooks: warning: database not reachable at start ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else 'no answer'}); starting anyway, "
              "deliveries wait until it answers", file=sys.stderr)


@signals.worker_ready.connect
def _start_metrics(**_: Any) -> None:
    """The metrics directory every process counts into; /metrics if WEBHOOKS_METRICS_PORT."""
    from worker.metrics import log as metrics_log
    from worker.metrics import prepare_worker

    try:
        prepare_worker(settings)
    except OSError as exc:  # deliveries matter more than their metrics: go on without
        metrics_log.error("metrics unavailable: %s", exc)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _archive_metrics(**_: Any) -> None:
    # Runs after _stop_engine (connected first): this process's counts go to the archive.
    from worker.metrics import process_exiting

    process_exiting(settings)
