"""Child processes of the bench: start them in their own process groups, sample, tear down."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil  # type: ignore[import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Environment for children: ours, the repository on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.update(extra)
    return env


def tool(name: str) -> list[str]:
    """Command prefix for a console script of the running interpreter's environment."""
    exe = VENV_BIN / name
    if exe.exists():
        return [str(exe)]
    if name == "celery":
        return [sys.executable, "-m", "celery"]
    if name == "webhooks":
        return [sys.executable, "-m", "worker.cli"]
    return [name]


class Children:
    """Registry of every subprocess started; ``stop_all`` kills their process groups."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.lock = threading.Lock()

    def start(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str],
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a new session (its own process group) and register it."""
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=str(ROOT),
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            start_new_session=True,
        )
        with self.lock:
            self.procs.append(proc)
        return proc

    def stop(self, procs: Iterable[subprocess.Popen[bytes]], grace: float = 8.0) -> None:
        """SIGTERM each group, wait up to ``grace`` seconds, then SIGKILL what is left."""
        procs = list(procs)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in procs:
            # The group may outlive its leader (prefork children): always sweep it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(2)
        with self.lock:
            self.procs = [p for p in self.procs if p not in procs]

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every registered process."""
        with self.lock:
            procs = list(self.procs)
        self.stop(procs, grace)


@dataclass
class Usage:
    """Resource use of a set of processes over a measured interval."""

    cpu_seconds: float = 0.0
    peak_rss: dict[int, int] = field(default_factory=dict)
    rss_at_mark: int = 0  # largest RSS of one process when the measured interval began
    rss_at_end: int = 0  # ... and when it ended

    @property
    def peak_rss_mb(self) -> float:
        """Largest peak RSS of any single process, in MiB."""
        return max(self.peak_rss.values(), default=0) / 2**20


class Sampler:
    """Samples RSS and CPU of root processes and all their descendants in a thread."""

    def __init__(self, roots: Sequence[int], interval: float = 0.2) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.cpu: dict[int, float] = {}
        self.cpu_base: dict[int, float] = {}
        self.peak: dict[int, int] = {}
        self.rss_now: dict[int, int] = {}
        self.rss_at_mark = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _procs(self) -> list[psutil.Process]:
        out: list[psutil.Process] = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                out.append(root)
                out.extend(root.children(recursive=True))
            except psutil.Error:
                continue
        return out

    def sample(self) -> None:
        """Take one sample now."""
        for p in self._procs():
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    t = p.cpu_times()
            except psutil.Error:
                continue
            with self._lock:
                self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
                self.rss_now[p.pid] = rss
                self.cpu[p.pid] = t.user + t.system
                self.cpu_base.setdefault(p.pid, 0.0)

    def current_rss(self) -> int:
        """Largest RSS of one process at the latest sample."""
        with self._lock:
            return max(self.rss_now.values(), default=0)

    def mark(self) -> None:
        """Start of the measured interval: CPU used so far is not counted."""
        self.sample()
        with self._lock:
            self.cpu_base = dict(self.cpu)
            self.rss_at_mark = max(self.rss_now.values(), default=0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> Sampler:
        """Begin sampling in the background."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> Usage:
        """Stop sampling; return CPU since ``mark`` and peak RSS per process."""
        self.sample()
        self._stop.set()
        self._thread.join(2)
        with self._lock:
            cpu = sum(v - self.cpu_base.get(pid, 0.0) for pid, v in self.cpu.items())
            return Usage(cpu_seconds=cpu, peak_rss=dict(self.peak),
                         rss_at_mark=self.rss_at_mark,
                         rss_at_end=max(self.rss_now.values(), default=0))


def cpu_seconds(pids: Iterable[int]) -> float:
    """Total user+system CPU seconds of the given processes now (missing ones count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


SERVERS = ("redis-server", "postgres")


def foreign_cpu() -> dict[int, float]:
    """CPU seconds so far of every process outside this bench and its servers, by pid.

    Used to show when something else was competing for the cores during a measurement.
    """
    ours = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        ours.update(p.pid for p in psutil.Process().children(recursive=True))
    out: dict[int, float] = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        name = p.info["name"] or ""
        t = p.info["cpu_times"]
        if p.pid in ours or t is None or name.startswith(SERVERS):
            continue
        out[p.pid] = t.user + t.system
    return out


def foreign_cores(before: Mapping[int, float], seconds: float) -> float:
    """Average cores used by foreign processes since ``before`` was taken."""
    if seconds <= 0:
        return 0.0
    now = foreign_cpu()
    used = sum(v - before.get(pid, 0.0) for pid, v in now.items())
    return max(0.0, used) / seconds
