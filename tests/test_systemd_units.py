"""deploy/systemd: the units pass `systemd-analyze verify` in a scratch root laid out as the
README's install recipe leaves a host, score at most 3.0 in `systemd-analyze security`, and
keep the settings the worker depends on (a writable state directory for the SQLite default,
a non-root user, no restart loop on exit 78).

The systemd-analyze checks skip where the tool is missing; the file checks run everywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UNITS = ("webhooks-worker.service", "webhooks-beat.service")
VENV_BIN = "opt/webhook-worker/.venv/bin"
STATE_DIR = "/var/lib/webhook-worker"
# Where distributions keep systemd's own units (sysinit.target, network-online.target, ...).
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; joins backslash continuations, keeps repeats."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    return [w for value in unit.get(section, {}).get(key, []) for w in value.split()]


def one(unit: dict[str, dict[str, list[str]]], key: str) -> str:
    values = unit["Service"].get(key, [])
    assert len(values) == 1, f"{key}= set {len(values)} times: {values}"
    return values[0]


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root as the install recipe leaves it: units in /etc/systemd/system, the env file,
    an executable at the venv's celery (a stub: verify checks that ExecStart= exists and is
    executable, not what it does), and the host's own systemd units for the targets."""
    host_units = next((d for d in SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if host_units is None:
        pytest.skip("no systemd unit directory (sysinit.target) on this host")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(DEPLOY / unit, root / "etc/systemd/system" / unit)
    (root / "etc/webhook-worker").mkdir(parents=True)
    shutil.copy(DEPLOY / "env.example", root / "etc/webhook-worker/env")
    (root / "etc/webhook-worker/env").chmod(0o600)
    (root / VENV_BIN).mkdir(parents=True)
    celery = root / VENV_BIN / "celery"
    celery.write_text("#!/bin/sh\nexit 0\n")
    celery.chmod(0o755)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"--root={root}", *units],
        capture_output=True, text=True, timeout=30,
    )


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify_in_a_scratch_root(scratch_root: Path) -> None:
    done = verify(scratch_root, *UNITS)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    assert output == "", f"verify is not clean:\n{output}"


@needs_systemd_analyze
def test_verify_does_look_at_the_scratch_root(scratch_root: Path) -> None:
    """The check above means something: without the venv's celery, verify fails."""
    celery = scratch_root / VENV_BIN / "celery"
    celery.chmod(0o644)
    try:
        done = verify(scratch_root, UNITS[0])
    finally:
        celery.chmod(0o755)
    assert done.returncode != 0
    assert "/opt/webhook-worker/.venv/bin/celery" in done.stdout + done.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_3(unit: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(DEPLOY / unit)],
        capture_output=True, text=True, timeout=30,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, f"no overall exposure in:\n{done.stdout}\n{done.stderr}"
    exposure = float(match.group(1))
    print(f"{unit}: overall exposure {exposure}")
    assert exposure <= 3.0, done.stdout


@pytest.mark.parametrize("name", UNITS)
def test_units_keep_what_the_worker_needs(name: str) -> None:
    unit = parse_unit(DEPLOY / name)
    # The state directory: created and owned by systemd, the one writable place under
    # ProtectSystem=strict, and the working directory, so the SQLite default lands there.
    assert one(unit, "StateDirectory") == "webhook-worker"
    assert one(unit, "WorkingDirectory") == STATE_DIR
    assert one(unit, "ProtectSystem") == "strict"
    assert "ReadWritePaths" not in unit["Service"]  # StateDirectory= does it
    # Not root.
    user = unit["Service"].get("User", [""])[-1]
    assert unit["Service"].get("DynamicUser", ["no"])[-1] == "yes" or user not in ("", "root", "0")
    # Exit 78 (no sealing key) is a configuration error: no restart loop.
    assert "78" in words(unit, "Service", "RestartPreventExitStatus")
    assert one(unit, "EnvironmentFile") == "/etc/webhook-worker/env"
    for key in ("Wants", "After"):
        assert "network-online.target" in words(unit, "Unit", key)
        assert "redis-server.service" in words(unit, "Unit", key)
    exec_start = one(unit, "ExecStart").split()
    assert exec_start[0] == f"/{VENV_BIN}/celery"
    assert exec_start[1:3] == ["-A", "worker.celery_app"]


def test_worker_unit_waits_for_postgresql_and_runs_the_worker() -> None:
    unit = parse_unit(DEPLOY / "webhooks-worker.service")
    for key in ("Wants", "After"):
        assert "postgresql.service" in words(unit, "Unit", key)
    exec_start = one(unit, "ExecStart").split()
    assert exec_start[3] == "worker"
    assert {"--without-gossip", "--without-mingle"} <= set(exec_start)


def test_beat_unit_keeps_its_schedule_in_the_state_directory() -> None:
    exec_start = one(parse_unit(DEPLOY / "webhooks-beat.service"), "ExecStart").split()
    assert exec_start[3] == "beat"
    assert exec_start[exec_start.index("--schedule") + 1] == f"{STATE_DIR}/celerybeat-schedule"


def test_env_example_defaults_to_sqlite_in_the_state_directory() -> None:
    lines = (DEPLOY / "env.example").read_text().splitlines()
    active = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert active["DATABASE_URL"] == f"sqlite+aiosqlite:///{STATE_DIR}/webhooks.db"
    # Production settings are there, commented out.
    assert any(line.startswith("#DATABASE_URL=postgresql+asyncpg://") for line in lines)
    assert any(line.startswith("#WEBHOOKS_SECRET_KEYS=") for line in lines)
