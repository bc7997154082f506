"""Prometheus metrics: what the engines of a host count, and what the database says.

Two sources, one exposition:

- What each process's delivery engine counts (worker.delivery.metrics_hooks): attempts,
  durations, latency, health changes, what it holds. With WEBHOOKS_METRICS_DIR set,
  prometheus_client's multiprocess mode keeps these in one file per process in that
  directory, so Celery's main process and every prefork child count into one place and any
  one process of the host can expose their sum. Without it they are the process's own (enough
  for `--pool solo`; with prefork, the children's would be lost).
- Gauges read from the database on scrape (`DatabaseCollector`): backlog, oldest due
  delivery, endpoint states. They are the same seen from every host: take them from one
  exporter (`webhooks metrics --db-only`), or aggregate them with max(), never sum().

prometheus_client chooses multiprocess mode from the environment when its first value is
made, so nothing here imports it at import time: `process_metrics` first puts the directory
into the environment.

Files of dead processes are folded into one archive file per metric type (`compact`), under
an exclusive lock that the collector here takes shared: a scrape sees a process's counts
either in its own file or in the archive, never twice and never not at all. Counters stay
monotonic across child recycling and worker restarts, and the directory does not grow with
every prefork child that ever lived.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import importlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from worker.core.models import DeliveryStatus
from worker.settings import Settings

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

log = logging.getLogger("webhooks.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds, for one attempt: connect, send, read (bounded by the request timeout).
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
# Seconds from commit to the successful attempt: first tries, then the retry schedule.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                   900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
# A database gauge reading is reused by scrapes within this many seconds of it.
DATABASE_MAX_AGE = 5.0
# Written by compaction: a dead process's counters and histograms, summed.
ARCHIVE = "archive"
LOCK_FILE = ".lock"
ENDPOINT_STATES = ("enabled", "disabled", "circuit_open")


# -- this process's metric objects -----------------------------------------------------------

# Every metric update here happens under this lock, and fork waits for it: a child never
# inherits a lock of prometheus_client held by another thread of its parent (the engine
# thread of Celery's main process updates metrics while the main thread forks children).
_update_lock = threading.RLock()


def _before_fork() -> None:
    _update_lock.acquire()


def _after_fork_in_parent() -> None:
    _update_lock.release()


def _after_fork_in_child() -> None:
    global _update_lock
    _update_lock = threading.RLock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def updating() -> contextlib.AbstractContextManager[Any]:
    """Hold this around every change to a metric: `with updating(): counter.inc()`."""
    return _update_lock


def metrics_dir(settings: Settings) -> str | None:
    """The directory every process of this host counts into, if any."""
    return settings.metrics_dir or os.environ.get(MULTIPROC_ENV) or None


def use_metrics_dir(settings: Settings) -> str | None:
    """Point prometheus_client at the metrics directory, before this process makes a metric."""
    path = metrics_dir(settings)
    if path:
        os.makedirs(path, exist_ok=True)
        os.environ[MULTIPROC_ENV] = path
        values = _untyped("values")
        # Imported before the directory was known (by a library, a test): choose again.
        if not getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = values.get_value_class()
    return path


class Metrics:
    """The metric objects the engines of one process update.

    Not registered in prometheus_client's global registry: in multiprocess mode the values
    live in files and `registry` is unused; without it, `registry` is this process's view.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "webhooks_attempts", "Delivery attempts, once recorded, by outcome (success, retry, "
            "failed, disable, blocked), error kind, HTTP status class and endpoint class",
            ("outcome", "error_kind", "status_class", "endpoint_class"), registry=r)
        self.attempt_duration = Histogram(
            "webhooks_attempt_duration_seconds", "Duration of one attempt: connect, send, read",
            ("outcome", "endpoint_class"), buckets=ATTEMPT_BUCKETS, registry=r)
        self.delivery_latency = Histogram(
            "webhooks_delivery_latency_seconds", "From the delivery's commit (enqueue) to its "
            "successful attempt, retries included", ("endpoint_class",),
            buckets=LATENCY_BUCKETS, registry=r)
        self.circuit_changes = Counter(
            "webhooks_circuit_changes", "Endpoint health changes: circuit_opened, "
            "circuit_closed, endpoint_disabled", ("event",), registry=r)
        self.in_flight = Gauge(
            "webhooks_in_flight", "Attempts running now", registry=r,
            multiprocess_mode="livesum")
        self.waiting = Gauge(
            "webhooks_waiting", "Deliveries leased to a running engine and waiting for a slot "
            "(parked ones included)", registry=r, multiprocess_mode="livesum")
        self.unwritten = Gauge(
            "webhooks_unwritten_outcomes", "Attempt outcomes not yet written to the database",
            registry=r, multiprocess_mode="livesum")


_process_metrics: Metrics | None = None


def process_metrics(settings: Settings) -> Metrics:
    """This process's metrics, made on first use (after the directory is in place)."""
    global _process_metrics
    with updating():
        if _process_metrics is None:
            use_metrics_dir(settings)
            _process_metrics = Metrics()
        return _process_metrics


class _Locked:
    """This process's own registry, collected under the update lock."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        with updating():
            return list(self._registry.collect())


# -- the files of a host's processes -----------------------------------------------------------

def _pid_of(filename: str) -> int | None:
    stem = os.path.basename(filename).removesuffix(".db")
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _dir_lock(path: str, exclusive: bool) -> Iterator[None]:
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _untyped(module: str) -> Any:
    """A prometheus_client module whose functions carry no annotations."""
    return importlib.import_module(f"prometheus_client.{module}")


def _read(filename: str) -> list[tuple[str, float]]:
    try:
        return [(key, value) for key, value, _, _ in
                _untyped("mmap_dict").MmapedDict.read_all_values_from_file(filename)]
    except FileNotFoundError:
        return []


def _archive_token(archive: str) -> str | None:
    """The token of the data file the archive link points at (None: no archive yet)."""
    try:
        target = os.readlink(archive)
    except (FileNotFoundError, OSError):
        return None
    return target.rsplit("-", 1)[-1].removesuffix(".data")


def compact(path: str, pids: Iterable[int]) -> int:
    """Fold the counters and histograms of the processes `pids` (dead, or exiting now) into
    the archive, and drop their live gauges. Returns how many files were folded.

    Counter and histogram values (bucket counts, sums) add up, so an archived value is the sum
    over every process that ever had it. A scrape (which holds the lock shared) sees each
    process's counts once. Crash-safe: `<type>_archive.db` is a link to a data file, replaced
    in one step; the files being folded are first renamed after the data file they go into,
    so whatever a crash leaves is either already in the archive (dropped) or folded next time.
    """
    wanted = {str(pid) for pid in pids}
    if not os.path.isdir(path):
        return 0
    folded = 0
    with _dir_lock(path, exclusive=True):
        for typ in ("counter", "histogram"):
            archive = os.path.join(path, f"{typ}_{ARCHIVE}.db")
            current = _archive_token(archive)
            # What an interrupted compaction left: folded already, or still to fold.
            leftovers = glob.glob(os.path.join(path, f".fold-*-{typ}_*.db"))
            for name in [f for f in leftovers if f"/.fold-{current}-" in f]:
                os.remove(name)
            unfolded = [f for f in leftovers if f"/.fold-{current}-" not in f]
            files = [f for f in glob.glob(os.path.join(path, f"{typ}_*.db"))
                     if str(_pid_of(f)) in wanted]
            if not files and not unfolded:
                continue
            token = uuid.uuid4().hex[:16]
            moved = []
            for filename in files:  # out of the collectors' sight (not <type>_*.db)
                target = os.path.join(path, f".fold-{token}-{os.path.basename(filename)}")
                os.rename(filename, target)
                moved.append(target)
            totals: dict[str, float] = {}
            for filename in [archive, *unfolded, *moved]:
                for key, value in _read(filename):
                    totals[key] = totals.get(key, 0.0) + value
            data = f".{typ}_{ARCHIVE}-{token}.data"
            out = _untyped("mmap_dict").MmapedDict(os.path.join(path, data))
            try:
                for key, value in totals.items():
                    out.write_value(key, value, 0.0)
            finally:
                out.close()
            link = os.path.join(path, f".{typ}_{ARCHIVE}-{token}.link")
            os.symlink(data, link)
            os.replace(link, archive)  # the commit
            for filename in [*unfolded, *moved]:
                os.remove(filename)
            for stale in glob.glob(os.path.join(path, f".{typ}_{ARCHIVE}-*")):
                if not stale.endswith(f"-{token}.data"):
                    os.remove(stale)
            folded += len(files)
        for filename in glob.glob(os.path.join(path, "gauge_live*_*.db")):
            if str(_pid_of(filename)) in wanted:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(filename)
    return folded


def dead_pids(path: str) -> set[int]:
    """Processes with files in `path` that no longer run (seen from this pid namespace)."""
    pids = {_pid_of(f) for f in glob.glob(os.path.join(path, "*.db"))}
    return {pid for pid in pids if pid is not None and pid != os.getpid() and not _alive(pid)}


class HostCollector:
    """The metrics of every process of this host, from the directory they count into."""

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path

    def collect(self) -> Iterable[Metric]:
        multiprocess = _untyped("multiprocess")
        # A process killed outright (SIGKILL, the OOM killer) left its live gauges behind.
        dead_gauges = {_pid_of(f) for f in glob.glob(os.path.join(self.path, "gauge_live*.db"))}
        gone = [pid for pid in dead_gauges if pid is not None and not _alive(pid)]
        if gone:
            with _dir_lock(self.path, exclusive=True):
                for pid in gone:
                    multiprocess.mark_process_dead(pid, self.path)
        with _dir_lock(self.path, exclusive=False):
            found: list[Metric] = list(
                multiprocess.MultiProcessCollector(None, self.path).collect())
            return found


# -- the database's gauges ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DatabaseReading:
    statuses: dict[str, int]  # each counted up to the count limit
    due: int  # pending, due, not leased, endpoint's circuit not open; up to the count limit
    oldest_due_seconds: float  # 0 when nothing is due
    endpoints: dict[str, int]  # enabled, disabled, circuit_open (disjoint)


async def read_database(settings: Settings, now: datetime | None = None) -> DatabaseReading:
    """One short read-only connection: bounded counts, one index lookup, the endpoints."""
    from sqlalchemy import and_, case, func, literal, or_, select
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from worker.db.fifo import at_queue_head
    from worker.db.schema import deliveries as d
    from worker.db.schema import endpoints as e

    now = now or datetime.now(UTC)
    cap = settings.metrics_count_limit
    url = make_url(settings.database_url)
    timeout = settings.metrics_db_timeout
    connect_args: dict[str, Any] = {"timeout": timeout}
    if url.get_backend_name() == "postgresql":
        connect_args["server_settings"] = {
            "statement_timeout": str(int(timeout * 1000)),
            "application_name": "webhooks-metrics"}
    engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args)

    def capped(*where: Any) -> Any:
        # Counting stops at the cap: a scrape costs at most `cap` index entries per status.
        inner = select(literal(1).label("one")).select_from(d).where(*where).limit(cap)
        return select(func.count()).select_from(inner.subquery()).scalar_subquery()

    open_circuits = select(e.c.id).where(e.c.circuit_open_until > now)
    due_where = (d.c.status == DeliveryStatus.PENDING.value, d.c.next_attempt_at <= now,
                 or_(d.c.locked_until.is_(None), d.c.locked_until < now),
                 d.c.endpoint_id.not_in(open_circuits), at_queue_head())
    statuses = list(DeliveryStatus)
    counts = select(*(capped(d.c.status == s.value).label(s.value) for s in statuses),
                    capped(*due_where).label("due"))
    oldest = select(d.c.next_attempt_at).where(*due_where).order_by(
        d.c.next_attempt_at).limit(1)
    is_open = and_(e.c.enabled.is_(True), e.c.circuit_open_until > now)
    states = select(
        func.coalesce(func.sum(case((and_(e.c.enabled.is_(True),
                                          or_(e.c.circuit_open_until.is_(None),
                                              e.c.circuit_open_until <= now)), 1), else_=0)), 0),
        func.coalesce(func.sum(case((e.c.enabled.is_(False), 1), else_=0)), 0),
        func.coalesce(func.sum(case((is_open, 1), else_=0)), 0))
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(counts)).one()
            first_due = (await conn.execute(oldest)).scalar()
            enabled, disabled, circuit_open = (await conn.execute(states)).one()
    finally:
        await engine.dispose()
    return DatabaseReading(
        statuses={s.value: int(row._mapping[s.value]) for s in statuses},
        due=int(row._mapping["due"]),
        oldest_due_seconds=max((now - first_due).total_seconds(), 0.0) if first_due else 0.0,
        endpoints={"enabled": int(enabled), "disabled": int(disabled),
                   "circuit_open": int(circuit_open)})


class DatabaseCollector:
    """Gauges read from the database when scraped, from whichever process serves /metrics.

    Each reading is its own `asyncio.run` on the scraping thread, with a connection of its own
    (no pool): nothing outlives the scrape, nothing is shared with an engine's loop. Bounded
    by WEBHOOKS_METRICS_DB_TIMEOUT; within DATABASE_MAX_AGE seconds of a reading, scrapes
    reuse it. A reading that fails leaves the gauges out and says so in
    `webhooks_metrics_database_up`.
    """

    def __init__(self, settings: Settings, *, max_age: float = DATABASE_MAX_AGE) -> None:
        self.settings = settings
        self.max_age = max_age
        self._lock = threading.Lock()
        self._last: tuple[float, DatabaseReading | None, float] | None = None

    def reading(self) -> tuple[DatabaseReading | None, float]:
        """The latest reading (None: it failed) and how long it took, in seconds."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self.max_age:
                return self._last[1], self._last[2]
            started = time.monotonic()
            try:
                found: DatabaseReading | None = asyncio.run(asyncio.wait_for(
                    read_database(self.settings), self.settings.metrics_db_timeout))
            except Exception as exc:
                log.warning("metrics: could not read the database: %s: %s",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                found = None
            took = time.monotonic() - started
            self._last = (time.monotonic(), found, took)
            return found, took

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        found, took = self.reading()
        yield GaugeMetricFamily("webhooks_metrics_database_up",
                                "1 if the database gauges could be read at this scrape",
                                value=0.0 if found is None else 1.0)
        yield GaugeMetricFamily("webhooks_metrics_database_seconds",
                                "How long reading the database gauges took", value=took)
        if found is None:
            return
        limit = self.settings.metrics_count_limit
        by_status = GaugeMetricFamily(
            "webhooks_deliveries", f"Deliveries by status (counted up to {limit}; "
            "WEBHOOKS_METRICS_COUNT_LIMIT)", labels=["status"])
        for status, count in found.statuses.items():
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily(
            "webhooks_due_backlog", "Pending deliveries due now that no worker holds (their "
            f"endpoint's circuit not open; counted up to {limit})", value=found.due)
        yield GaugeMetricFamily(
            "webhooks_oldest_due_seconds", "How long the longest-waiting due delivery has been "
            "due (0: none)", value=found.oldest_due_seconds)
        states = GaugeMetricFamily("webhooks_endpoints", "Endpoints by state: enabled (circuit "
                                   "closed), disabled, circuit_open", labels=["state"])
        for state in ENDPOINT_STATES:
            states.add_metric([state], found.endpoints[state])
        yield states


# -- exposition --------------------------------------------------------------------------------

def exposition_registry(settings: Settings, *, process: bool = True,
                        database: bool = True) -> CollectorRegistry:
    """What /metrics serves: this host's processes and/or the database's gauges."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    if process:
        path = metrics_dir(settings)
        collector: Collector = (HostCollector(path) if path
                                else _Locked(process_metrics(settings).registry))
        registry.register(collector)
    if database:
        registry.register(DatabaseCollector(settings))
    return registry


def render(settings: Settings, *, process: bool = True, database: bool = True) -> str:
    """The exposition text, once."""
    from prometheus_client import generate_latest

    return generate_latest(exposition_registry(settings, process=process,
                                               database=database)).decode()


def serve(settings: Settings, host: str, port: int, *, process: bool = True,
          database: bool = True) -> WSGIServer:
    """Serve /metrics from a daemon thread; returns the server (`server_port`, `shutdown()`)."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host, registry=exposition_registry(
        settings, process=process, database=database))
    # A forked child (a prefork pool process) must not keep the listening socket open.
    os.register_at_fork(after_in_child=server.socket.close)
    return server


# -- the worker's side ---------------------------------------------------------------------------

_server: WSGIServer | None = None


def prepare_worker(settings: Settings) -> None:
    """In Celery's main process, once it is ready: the directory (with what earlier runs
    left folded into the archive), and /metrics when WEBHOOKS_METRICS_PORT is set."""
    global _server
    path = use_metrics_dir(settings)
    if path:
        folded = compact(path, dead_pids(path))
        if folded:
            log.info("metrics: folded %d files of exited processes into the archive", folded)
    if settings.metrics_port is not None and _server is None:
        _server = serve(settings, settings.metrics_host, settings.metrics_port,
                        database=settings.metrics_database)
        log.info("metrics: serving /metrics on %s:%d", settings.metrics_host,
                 settings.metrics_port)


def process_exiting(settings: Settings) -> None:
    """At a worker process's exit, once its engine stopped: its counts go to the archive,
    its live gauges away."""
    path = metrics_dir(settings)
    if path and os.path.isdir(path):
        try:
            compact(path, [os.getpid()])
        except OSError as exc:  # its files stay; the next start folds them
            log.warning("metrics: could not archive this process's counts: %s", exc)


def run_exporter(settings: Settings, host: str, port: int, *, process: bool, database: bool,
                 once: bool = False) -> int:
    """`webhooks metrics`: serve (or print once) this host's and/or the database's metrics."""
    from worker.core.errors import WebhookError

    if process and not metrics_dir(settings):
        raise WebhookError("webhooks metrics reads the worker processes' counts from "
                           "WEBHOOKS_METRICS_DIR: set it as for the worker, or pass --db-only")
    if once:
        sys.stdout.write(render(settings, process=process, database=database))
        return 0
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = serve(settings, host, port, process=process, database=database)
    except OSError as exc:
        raise WebhookError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    parts = ([f"processes from {metrics_dir(settings)}"] if process else []) + (
        ["database gauges"] if database else [])
    print(f"serving /metrics on http://{host}:{server.server_port}/metrics "
          f"({', '.join(parts)})", flush=True)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()
    return 0
