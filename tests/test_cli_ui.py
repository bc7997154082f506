"""`webhooks ui` and `webhooks portal-link` in-process: refusals in one line, and a printed
link that opens its endpoint's portal and nothing else."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from worker.cli import main
from worker.settings import get_settings
from worker.ui.portal import portal_keys, verify_link

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DATABASE_URL", database_url)
    for name in ("WEBHOOKS_UI_TOKEN", "WEBHOOKS_UI_SECRET", "WEBHOOKS_UI_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, *wanted: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("webhooks: error: "), err
    for part in wanted:
        assert part in err, err


def test_portal_link_prints_a_signed_expiring_url(env_db: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["endpoints", "add", "--url", "https://partner.example/hook", "--id",
                 "ep-one"]) == 0
    capsys.readouterr()
    before = time.time()
    assert main(["portal-link", "ep-one", "--expires", "2h",
                 "--base-url", "https://hooks.example.com/"]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("https://hooks.example.com/portal/")
    token = url.rsplit("/", 1)[1]
    from worker.keys import load_keyring

    keys = portal_keys(None, load_keyring(get_settings()))
    endpoint, expires = verify_link(keys, token, time.time())
    assert endpoint == "ep-one" and before + 7200 - 5 <= expires <= time.time() + 7200
    assert main(["portal-link", "ep-one", "--json"]) == 0
    assert '"url": "http://127.0.0.1:8400/portal/' in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "wanted"), [
    (["portal-link", "ep-missing"], "no endpoint with id 'ep-missing'"),
    (["portal-link", "bad id"], "endpoint id"),
    (["portal-link", "ep-one", "--expires", "forever"], "--expires"),
    (["portal-link", "ep-one", "--expires", "400d"], "--expires"),
])
def test_portal_link_refuses_bad_input(env_db: str, capsys: pytest.CaptureFixture[str],
                                       argv: list[str], wanted: str) -> None:
    assert main(["endpoints", "add", "--url", "https://partner.example/hook", "--id",
                 "ep-one"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, main(argv), wanted)


def test_ui_refuses_a_public_address_without_a_token(
        env_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _one_line_error(capsys, main(["ui", "--host", "0.0.0.0", "--port", "0"]),
                    "WEBHOOKS_UI_TOKEN", "not a loopback")
    monkeypatch.setenv("WEBHOOKS_UI_TOKEN", "short")
    get_settings.cache_clear()
    _one_line_error(capsys, main(["ui", "--port", "0"]), "at least 16")


def test_ui_refuses_a_database_at_another_revision(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.db.migrate import upgrade

    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0003")
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        _one_line_error(capsys, main(["ui", "--port", "0"]), "at revision 0003",
                        "webhooks db upgrade")
    finally:
        get_settings.cache_clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ui_on_the_embedded_default_makes_its_database_and_prints_a_login_url(
        tmp_path: Path) -> None:
    """A clean directory, no settings at all: `webhooks ui` serves, behind a printed token."""
    port = _free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WEBHOOKS_UI_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "ui"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while not any("log in at" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline())
        login = re.search(r"(http://127\.0\.0\.1:\d+/login\?token=\S+)", "".join(lines))
        assert login, lines
        assert (tmp_path / "webhooks.db").exists() and (tmp_path / "webhooks.db.key").exists()
        session = requests.Session()
        assert session.get(f"http://127.0.0.1:{port}/deliveries",
                           allow_redirects=False).status_code == 401
        page = session.get(login.group(1), timeout=10)
        assert page.status_code == 200 and "Attempts per minute" in page.text
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0
