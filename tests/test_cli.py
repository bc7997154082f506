"""`webhooks` (worker.cli.main) in-process, on a fresh SQLite file named by DATABASE_URL, or on
both backends (`any_db`: SQLite and the session's PostgreSQL) where the database matters."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from worker.cli import main
from worker.core.errors import InvalidSignature
from worker.core.sealing import KeyRing, generate_key
from worker.core.signing import (
    generate_secret,
    generate_signing_key,
    parse_signing_keys,
    public_key_of,
    secret_key,
    signed_headers,
    verify,
)
from worker.db.connection import create_engine
from worker.db.schema import deliveries, endpoints
from worker.db.store import Store, open_store
from worker.settings import Settings, get_settings

# What `_endpoint_json` holds for every endpoint, and nothing else.
ENDPOINT_FIELDS = {
    "id", "url", "event_types", "enabled", "disabled_reason", "description", "created_at",
    "secrets", "public_keys", "headers", "verify_tls", "max_in_flight", "rate_limit",
    "rate_burst", "failure_streak", "failing_since", "circuit", "credential_error", "ordering",
}
HOW_TO_GET_A_KEY = "webhooks keys generate"


@pytest.fixture
def cli_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DATABASE_URL set to a fresh SQLite file; the cached settings cleared around the test."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


@pytest.fixture
def any_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DATABASE_URL set to a migrated, empty database: SQLite, then PostgreSQL."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


@pytest.fixture
def pg_url(pg_database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DATABASE_URL set to the session's PostgreSQL database (not emptied)."""
    monkeypatch.setenv("DATABASE_URL", pg_database)
    get_settings.cache_clear()
    yield pg_database
    get_settings.cache_clear()


def _set_env(monkeypatch: pytest.MonkeyPatch, name: str, value: str | None) -> None:
    """Change one variable for the CLI: the settings are read once, so clear their cache."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBHOOKS_SECRET_KEY_FILE", raising=False)
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEYS", None)


Run = tuple[int, str, str]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(cli_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The fresh database, migrated through the CLI."""
    code, out, _ = _run(capsys, "db", "upgrade")
    assert code == 0, out
    return cli_url


def _list(capsys: pytest.CaptureFixture[str], *flags: str) -> list[dict[str, Any]]:
    code, out, err = _run(capsys, "endpoints", "list", "--json", *flags)
    assert code == 0, err
    value = json.loads(out)
    assert isinstance(value, list)
    return value


def _show(capsys: pytest.CaptureFixture[str], endpoint_id: str, *flags: str) -> dict[str, Any]:
    code, out, err = _run(capsys, "endpoints", "show", endpoint_id, "--json", *flags)
    assert code == 0, err
    value = json.loads(out)
    assert isinstance(value, dict)
    return value


def _add(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = _run(capsys, "endpoints", "add", *args, "--json")
    assert code == 0, err
    value = json.loads(out)
    assert isinstance(value, dict)
    return value


def _secret_values(ep: dict[str, Any]) -> list[str]:
    return [item["secret"] for item in ep["secrets"]]


def _printed(out: str, label: str) -> list[str]:
    """The values `endpoints add` / `rotate-secret` print after `label` ("secret", ...)."""
    return re.findall(rf"^  {label}\s+(\S+)", out, re.MULTILINE)


def _assert_error(result: Run) -> str:
    code, out, err = result
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("webhooks: error: ")
    return lines[0]


def _with_store(url: str, work: Any) -> Any:
    async def run() -> Any:
        settings = Settings(database_url=url)
        engine = create_engine(settings)
        try:
            return await work(open_store(engine, settings))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _raw_credentials(url: str) -> dict[str, str]:
    """The `credentials` column as stored, by endpoint id."""

    async def read(store: Store) -> dict[str, str]:
        async with store.engine.connect() as conn:
            rows = await conn.execute(select(endpoints.c.id, endpoints.c.credentials))
            return {row.id: row.credentials for row in rows}

    return _with_store(url, read)


def _set_endpoint_columns(url: str, endpoint_id: str, **values: Any) -> None:
    async def put(store: Store) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                               .values(**values))

    _with_store(url, put)


def _kid(ring: str) -> str:
    return KeyRing.parse(ring).sealing_key_id


def _near(iso: str, expected: datetime, slack: float = 3.0) -> bool:
    return abs((datetime.fromisoformat(iso) - expected).total_seconds()) <= slack


# -- db upgrade, add ---------------------------------------------------------------------------


def test_db_upgrade(cli_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "db", "upgrade")
    assert code == 0
    assert "database at revision head" in out
    assert "cli.db" in out
    # Twice is fine, and the tables are there.
    assert _run(capsys, "db", "upgrade")[0] == 0
    assert _list(capsys) == []


def test_endpoints_add_json_generates_secret(any_db: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ep = _add(capsys, "--url", "https://hooks.example/in", "--id", "ep-1",
              "--description", "orders")
    assert set(ep) == ENDPOINT_FIELDS
    assert ep["id"] == "ep-1"
    assert ep["url"] == "https://hooks.example/in"
    assert ep["enabled"] is True
    assert ep["disabled_reason"] is None
    assert ep["description"] == "orders"
    assert ep["event_types"] == []
    assert ep["created_at"]
    (item,) = ep["secrets"]
    assert set(item) == {"scheme", "signs_until", "secret"}
    assert (item["scheme"], item["signs_until"]) == ("v1", None)
    assert item["secret"].startswith("whsec_")
    assert len(secret_key(item["secret"])) >= 24
    # The defaults of everything else.
    assert ep["public_keys"] == []
    assert ep["headers"] == {}
    assert (ep["verify_tls"], ep["max_in_flight"]) == (True, None)
    assert (ep["rate_limit"], ep["rate_burst"]) == (None, None)
    assert (ep["failure_streak"], ep["failing_since"]) == (0, None)
    assert (ep["circuit"], ep["credential_error"]) == ("closed", None)
    # Listed as added, its secret value only with --show-secret.
    assert _list(capsys, "--show-secret") == [ep]
    hidden = {**ep, "secrets": [{"scheme": "v1", "signs_until": None}]}
    assert _list(capsys) == [hidden]
    assert _show(capsys, "ep-1") == hidden


def test_endpoints_add_plain_output_and_generated_id(db: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "endpoints", "add", "--url", "https://hooks.example/h")
    assert code == 0
    (ep,) = _list(capsys, "--show-secret")
    assert ep["id"].startswith("ep_")
    assert f"endpoint {ep['id']}" in out
    assert "url         https://hooks.example/h" in out
    (secret,) = _secret_values(ep)
    assert _printed(out, "secret") == [secret]
    # Printed once: the secret appears on one line of the output only.
    assert out.count(secret) == 1
    assert _printed(out, "public key") == _printed(out, "signing key") == []
    assert "WARNING" not in out


def test_endpoints_add_keeps_given_secret_and_event_types(
    any_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = generate_secret()
    ep = _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--secret", secret,
              "--event-type", "order.created", "--event-type", "order.paid",
              "--event-type", "order.created")
    assert ep["secrets"] == [{"scheme": "v1", "signs_until": None, "secret": secret}]
    assert ep["event_types"] == ["order.created", "order.paid"]
    subscribed = _with_store(any_db, lambda s: s.subscribed_endpoints("order.paid"))
    assert [e.id for e in subscribed] == ["ep-1"]
    assert subscribed[0].secrets == (secret,)
    assert _with_store(any_db, lambda s: s.subscribed_endpoints("user.created")) == []


def test_endpoints_add_policy_options(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id",
                          "ep-1", "--rate-limit", "2.5", "--burst", "4", "--max-in-flight", "3",
                          "--insecure-skip-tls-verify", "--header", "Authorization: Bearer t0k3n",
                          "--header", "X-Tenant:  t-42 ", "--event-type", "a")
    assert code == 0, err
    assert "WARNING     TLS certificates are not verified" in out
    assert "events      a" in out
    ep = _show(capsys, "ep-1", "--show-secret")
    assert ep["headers"] == {"Authorization": "Bearer t0k3n", "X-Tenant": "t-42"}
    assert (ep["rate_limit"], ep["rate_burst"], ep["max_in_flight"]) == (2.5, 4, 3)
    assert ep["verify_tls"] is False
    stored = _with_store(any_db, lambda s: s.get_endpoint("ep-1"))
    assert stored.policy.headers == (("Authorization", "Bearer t0k3n"), ("X-Tenant", "t-42"))
    assert (stored.policy.rate_limit, stored.policy.rate_burst) == (2.5, 4)
    assert (stored.policy.max_in_flight, stored.policy.verify_tls) == (3, False)

    # --json of add shows what was just given, header values included.
    ep2 = _add(capsys, "--url", "https://b.example/", "--id", "ep-2", "--header", "X-K: v2")
    assert ep2["headers"] == {"X-K": "v2"}
    assert ep2["verify_tls"] is True


def test_secrets_and_header_values_are_sealed_at_rest(any_db: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    secret = generate_secret()
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--secret", secret,
         "--header", "X-Api-Key: hunter2-value")
    (token,) = _raw_credentials(any_db).values()
    kid = _kid(os.environ["WEBHOOKS_SECRET_KEYS"])
    assert token.startswith(f"sealed1.{kid}.")
    for plain in (secret, secret.removeprefix("whsec_"), "hunter2-value", "X-Api-Key"):
        assert plain not in token


def test_secrets_and_header_values_hidden_without_show_secret(
    any_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = generate_secret()
    header_value = "Bearer s3cr3t-header-value"
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--secret", v1,
         "--header", f"Authorization: {header_value}")
    signing_key, public_key = generate_signing_key()
    _add(capsys, "--url", "https://b.example/", "--id", "ep-2", "--secret", signing_key)
    hidden_from = [
        ("endpoints", "list"),
        ("endpoints", "list", "--json"),
        ("endpoints", "show", "ep-1"),
        ("endpoints", "show", "ep-1", "--json"),
        ("endpoints", "show", "ep-2"),
        ("endpoints", "show", "ep-2", "--json"),
        ("endpoints", "update", "ep-1", "--description", "d"),
        ("endpoints", "update", "ep-1", "--description", "d", "--json"),
        ("endpoints", "update", "ep-2", "--description", "d", "--json"),
    ]
    for argv in hidden_from:
        code, out, err = _run(capsys, *argv)
        assert code == 0, (argv, err)
        for secret in (v1, signing_key, header_value, "s3cr3t"):
            assert secret not in out + err, argv
    # The public key is no secret: shown either way.
    assert public_key in _run(capsys, "endpoints", "show", "ep-2")[1]
    assert _show(capsys, "ep-2")["public_keys"] == [public_key]
    assert _show(capsys, "ep-1")["headers"] == {"Authorization": "(hidden)"}
    assert "header       Authorization: (hidden)" in _run(capsys, "endpoints", "show", "ep-1")[1]

    # With --show-secret they are there.
    code, out, _ = _run(capsys, "endpoints", "list", "--show-secret")
    assert code == 0 and v1 in out and signing_key in out
    listed = _list(capsys, "--show-secret")
    assert [_secret_values(ep) for ep in listed] == [[v1], [signing_key]]
    assert listed[0]["headers"] == {"Authorization": header_value}
    code, out, _ = _run(capsys, "endpoints", "show", "ep-1", "--show-secret")
    assert code == 0 and v1 in out and header_value in out
    assert _secret_values(_show(capsys, "ep-2", "--show-secret")) == [signing_key]


def test_endpoints_add_v1a_prints_a_public_key_that_checks_the_signing_key(
    any_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id",
                          "ep-1", "--scheme", "v1a")
    assert code == 0, err
    (public,) = _printed(out, "public key")
    (signing,) = _printed(out, "signing key")
    assert public.startswith("whpk_") and signing.startswith("whsk_")
    assert _printed(out, "secret") == []
    assert out.count(signing) == 1

    body = b'{"type":"order.paid","id":1}'
    now = int(time.time())
    headers = signed_headers(parse_signing_keys([signing]), "msg_1", now, body)
    assert headers["webhook-signature"].startswith("v1a,")
    verify(public, headers, body)
    with pytest.raises(InvalidSignature):
        verify(generate_signing_key()[1], headers, body)
    with pytest.raises(InvalidSignature):
        verify(public, headers, body + b" ")

    # What the worker signs with is the printed key: its signatures check with the public key.
    stored = _with_store(any_db, lambda s: s.get_endpoint("ep-1"))
    assert stored.signing_secrets(datetime.now(UTC)) == (signing,)
    worker_headers = signed_headers(parse_signing_keys(stored.secrets), "msg_2", now, body)
    verify(public, worker_headers, body)

    ep = _show(capsys, "ep-1", "--show-secret")
    assert ep["public_keys"] == [public]
    assert ep["secrets"] == [{"scheme": "v1a", "signs_until": None, "secret": signing}]
    code, out, _ = _run(capsys, "endpoints", "show", "ep-1")
    assert f"public key   {public}" in out
    assert signing not in out
    assert "signs with   v1a" in out


def test_endpoints_add_scheme_both(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id",
                          "ep-1", "--scheme", "both")
    assert code == 0, err
    (hmac_secret,) = _printed(out, "secret")
    (public,) = _printed(out, "public key")
    (signing,) = _printed(out, "signing key")
    ep = _show(capsys, "ep-1", "--show-secret")
    assert [(s["scheme"], s["secret"]) for s in ep["secrets"]] == [
        ("v1", hmac_secret), ("v1a", signing)]
    assert ep["public_keys"] == [public] == [public_key_of(signing)]
    # One delivery carries both signatures; each receiver checks its own.
    body = b"{}"
    headers = signed_headers(parse_signing_keys(_secret_values(ep)), "msg_1", int(time.time()),
                             body)
    assert [sig.split(",")[0] for sig in headers["webhook-signature"].split()] == ["v1", "v1a"]
    verify(hmac_secret, headers, body)
    verify(public, headers, body)


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "ftp://files.example/in"],
        ["--url", "https:///no-host"],
        ["--url", "http://"],
        ["--url", "https://user:pass@hooks.example/in"],
        ["--url", "https://hooks.example/in#frag"],
        ["--url", "https://hooks.example/in", "--id=-leading-dash"],
        ["--url", "https://hooks.example/in", "--id", "has space"],
        ["--url", "https://hooks.example/in", "--id", "x" * 129],
        ["--url", "https://hooks.example/in", "--secret", "not-a-secret"],
        ["--url", "https://hooks.example/in", "--secret", "whsec_dG9vc2hvcnQ="],
        ["--url", "https://hooks.example/in", "--secret", "whsec_***"],
        ["--url", "https://hooks.example/in", "--secret", "whpk_" + "A" * 43 + "="],
        ["--url", "https://hooks.example/in", "--secret", "whsk_dG9vc2hvcnQ="],
        ["--url", "https://hooks.example/in", "--event-type", ""],
        # Rates, bursts and concurrency out of range.
        ["--url", "https://hooks.example/in", "--rate-limit", "0"],
        ["--url", "https://hooks.example/in", "--rate-limit=-1"],
        ["--url", "https://hooks.example/in", "--rate-limit", "nan"],
        ["--url", "https://hooks.example/in", "--rate-limit", "inf"],
        ["--url", "https://hooks.example/in", "--rate-limit", "5", "--burst", "0"],
        ["--url", "https://hooks.example/in", "--rate-limit", "5", "--burst=-3"],
        ["--url", "https://hooks.example/in", "--max-in-flight", "0"],
        ["--url", "https://hooks.example/in", "--max-in-flight=-1"],
    ],
)
def test_endpoints_add_invalid_input(db: str, capsys: pytest.CaptureFixture[str],
                                     args: list[str]) -> None:
    _assert_error(_run(capsys, "endpoints", "add", *args))
    assert _list(capsys) == []


# Headers an endpoint may not carry, and why.
BAD_HEADERS = [
    pytest.param(["X-A: a\r\nEvil: b"], id="crlf-injection"),
    pytest.param(["X-A: a\nEvil: b"], id="lf-injection"),
    pytest.param(["X-A: a\rb"], id="cr"),
    pytest.param(["X-A: a\x00b"], id="nul"),
    pytest.param(["X-A: a\x7fb"], id="del"),
    pytest.param(["X-A\r\nEvil: b"], id="crlf-in-name"),
    pytest.param(["webhook-signature: v1,forged"], id="webhook-signature"),
    pytest.param(["Webhook-Id: x"], id="webhook-id"),
    pytest.param(["webhook-anything: x"], id="webhook-prefix"),
    pytest.param(["Content-Type: text/plain"], id="content-type"),
    pytest.param(["Content-Length: 1"], id="content-length"),
    pytest.param(["Host: internal.example"], id="host"),
    pytest.param(["Transfer-Encoding: chunked"], id="transfer-encoding"),
    pytest.param(["User-Agent: x"], id="user-agent"),
    pytest.param(["no colon here"], id="no-colon"),
    pytest.param(["Bad Name: v"], id="space-in-name"),
    pytest.param([": v"], id="empty-name"),
    pytest.param(["X-A: 1", "x-a: 2"], id="duplicate"),
    pytest.param([f"X-H{i}: v" for i in range(21)], id="too-many"),
    pytest.param(["X-A: " + "v" * 4097], id="too-long"),
]


@pytest.mark.parametrize("headers", BAD_HEADERS)
def test_endpoints_add_refuses_bad_headers(db: str, capsys: pytest.CaptureFixture[str],
                                           headers: list[str]) -> None:
    args = [item for header in headers for item in ("--header", header)]
    _assert_error(_run(capsys, "endpoints", "add", "--url", "https://a.example/", *args))
    assert _list(capsys) == []


def test_endpoints_add_accepts_twenty_headers(db: str, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    args = [item for i in range(20) for item in ("--header", f"X-H{i}: v{i}")]
    ep = _add(capsys, "--url", "https://a.example/", *args)
    assert len(ep["headers"]) == 20
    assert ep["headers"]["X-H19"] == "v19"


# Literal non-public hosts in the spellings a resolver or browser accepts.
LITERAL_NON_PUBLIC = [
    "http://127.0.0.1:8080/h",
    "http://127.1/",
    "http://127.0.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://017700000001/",
    "http://0177.0.0.1/",
    "http://127.0.0.1./",
    "http://%31%32%37.0.0.1/",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",  # full-width digits
    "http://[::ffff:127.0.0.1]/",
    "http://[::1]/",
    "http://[::]/",
    "http://0/",
    "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of the metadata service
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[fe80::1%25eth0]/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
]


@pytest.mark.parametrize("url", LITERAL_NON_PUBLIC)
def test_endpoints_add_refuses_literal_non_public_hosts(
    db: str, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    line = _assert_error(_run(capsys, "endpoints", "add", "--url", url))
    assert "non-public address" in line
    assert "WEBHOOKS_ALLOWED_NETWORKS" in line
    assert _list(capsys) == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/h", "http://127.1/", "http://2130706433/", "http://0x7f.1/",
    "http://017700000001/", "http://127.0.0.1./", "http://[::ffff:127.0.0.1]/",
    "http://%31%32%37.0.0.1/",
])
def test_endpoints_add_allows_an_allowed_network(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    _set_env(monkeypatch, "WEBHOOKS_ALLOWED_NETWORKS", "127.0.0.0/8")
    ep = _add(capsys, "--url", url, "--id", "ep-1")
    assert ep["url"] == url
    assert [e["id"] for e in _list(capsys)] == ["ep-1"]


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/", "http://169.254.169.254/", "http://[::1]/", "http://0x0a000001/",
])
def test_allowed_networks_allow_only_themselves(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    _set_env(monkeypatch, "WEBHOOKS_ALLOWED_NETWORKS", "127.0.0.0/8")
    _assert_error(_run(capsys, "endpoints", "add", "--url", url))
    assert _list(capsys) == []


@pytest.mark.parametrize("url", [
    "https://hooks.example/in", "https://8.8.8.8/in", "https://[2606:4700:4700::1111]/in",
])
def test_endpoints_add_accepts_public_hosts(db: str, capsys: pytest.CaptureFixture[str],
                                            url: str) -> None:
    assert _add(capsys, "--url", url)["url"] == url


def test_endpoints_add_duplicate_id(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1")[0] == 0
    line = _assert_error(_run(capsys, "endpoints", "add", "--url", "https://b.example/",
                              "--id", "ep-1"))
    assert "ep-1" in line
    (ep,) = _list(capsys)
    assert ep["url"] == "https://a.example/"


# -- list, show ----------------------------------------------------------------------------------


def test_endpoints_list_plain(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "endpoints", "list")
    assert (code, out) == (0, "no endpoints\n")
    _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1")
    _run(capsys, "endpoints", "add", "--url", "https://b.example/", "--id", "ep-2",
         "--event-type", "a", "--event-type", "b")
    code, out, _ = _run(capsys, "endpoints", "list")
    assert code == 0
    assert out.splitlines() == [
        "ep-1\tenabled\tcircuit closed\t*\thttps://a.example/",
        "ep-2\tenabled\tcircuit closed\ta,b\thttps://b.example/",
    ]
    assert [ep["id"] for ep in _list(capsys)] == ["ep-1", "ep-2"]
    # --show-secret adds one indented line per secret.
    secrets = [_secret_values(ep)[0] for ep in _list(capsys, "--show-secret")]
    code, out, _ = _run(capsys, "endpoints", "list", "--show-secret")
    assert out.splitlines() == [
        "ep-1\tenabled\tcircuit closed\t*\thttps://a.example/", f"\t{secrets[0]}",
        "ep-2\tenabled\tcircuit closed\ta,b\thttps://b.example/", f"\t{secrets[1]}",
    ]


def test_endpoints_show_plain(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--event-type", "x",
         "--event-type", "y", "--rate-limit", "2.5", "--burst", "4", "--max-in-flight", "7",
         "--header", "X-A: va")
    code, out, err = _run(capsys, "endpoints", "show", "ep-1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == ["ep-1  enabled", "  url          https://a.example/",
                         "  events       x, y"]
    assert "  signs with   v1" in lines
    assert "  header       X-A: (hidden)" in lines
    assert "  rate limit   2.5/s, burst 4" in lines
    assert "  in flight    7" in lines
    assert "  TLS verify   yes" in lines
    assert "  circuit      closed; 0 failures in a row" in lines
    assert not any("ERROR" in line for line in lines)

    _add(capsys, "--url", "https://b.example/", "--id", "ep-2", "--insecure-skip-tls-verify")
    _run(capsys, "endpoints", "disable", "ep-2", "--reason", "maintenance")
    lines = _run(capsys, "endpoints", "show", "ep-2")[1].splitlines()
    assert lines[0] == "ep-2  disabled: maintenance"
    assert "  events       *" in lines
    assert "  rate limit   none (global default)" in lines
    assert "  in flight    global default" in lines
    assert "  TLS verify   NO (testing only)" in lines


def test_endpoints_show_circuit_and_health(any_db: str, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    now = datetime.now(UTC).replace(microsecond=0)
    since = now - timedelta(minutes=5)
    _set_endpoint_columns(any_db, "ep-1", failure_streak=3, failing_since=since,
                          circuit_open_until=now + timedelta(minutes=1))
    ep = _show(capsys, "ep-1")
    assert ep["failure_streak"] == 3
    assert datetime.fromisoformat(ep["failing_since"]) == since
    assert ep["circuit"] == f"open until {(now + timedelta(minutes=1)).isoformat()}"
    out = _run(capsys, "endpoints", "show", "ep-1")[1]
    assert f"; 3 failures in a row since {since.isoformat()}" in out
    assert "\tcircuit open until " in _run(capsys, "endpoints", "list")[1]

    _set_endpoint_columns(any_db, "ep-1", circuit_open_until=now - timedelta(seconds=1))
    assert _show(capsys, "ep-1")["circuit"] == "half-open (next attempt is the probe)"

    # Enabling clears the health record.
    assert _run(capsys, "endpoints", "enable", "ep-1")[0] == 0
    ep = _show(capsys, "ep-1")
    assert (ep["circuit"], ep["failure_streak"], ep["failing_since"]) == ("closed", 0, None)


# -- update ----------------------------------------------------------------------------------


def test_endpoints_update(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    secret = generate_secret()
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--secret", secret,
         "--event-type", "a", "--header", "X-Old: old-value")

    def updated(*args: str) -> dict[str, Any]:
        code, out, err = _run(capsys, "endpoints", "update", "ep-1", *args, "--json")
        assert code == 0, err
        value = json.loads(out)
        assert set(value) == ENDPOINT_FIELDS
        assert secret not in out
        return value

    assert updated("--url", "https://b.example/new")["url"] == "https://b.example/new"
    assert updated("--event-type", "x", "--event-type", "y")["event_types"] == ["x", "y"]
    assert updated("--all-events")["event_types"] == []
    assert updated("--description", "billing")["description"] == "billing"

    ep = updated("--rate-limit", "5", "--burst", "3")
    assert (ep["rate_limit"], ep["rate_burst"]) == (5.0, 3)
    ep = updated("--no-rate-limit")
    assert (ep["rate_limit"], ep["rate_burst"]) == (None, None)
    assert updated("--max-in-flight", "9")["max_in_flight"] == 9
    assert updated("--insecure-skip-tls-verify")["verify_tls"] is False
    assert updated("--verify-tls")["verify_tls"] is True

    # Headers are replaced as a set, and hidden in the output.
    ep = updated("--header", "X-New: new-value", "--header", "X-Two: 2")
    assert ep["headers"] == {"X-New": "(hidden)", "X-Two": "(hidden)"}
    assert _show(capsys, "ep-1", "--show-secret")["headers"] == {"X-New": "new-value",
                                                                 "X-Two": "2"}
    assert updated("--clear-headers")["headers"] == {}
    assert _show(capsys, "ep-1", "--show-secret")["headers"] == {}

    # Nothing above touched the secret, and the row still opens.
    ep = _show(capsys, "ep-1", "--show-secret")
    assert ep["secrets"] == [{"scheme": "v1", "signs_until": None, "secret": secret}]
    assert ep["credential_error"] is None
    assert ep["description"] == "billing"
    assert ep["url"] == "https://b.example/new"

    # Several at once, plain output.
    code, out, err = _run(capsys, "endpoints", "update", "ep-1", "--rate-limit", "0.5",
                          "--max-in-flight", "2", "--header", "X-P: plain-value")
    assert code == 0, err
    assert out.startswith("ep-1  enabled\n")
    assert "  rate limit   0.5/s, burst 1" in out
    assert "  in flight    2" in out
    assert "  header       X-P: (hidden)" in out
    assert "plain-value" not in out and secret not in out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--url", "ftp://a.example/"],
        ["--url", "http://127.1/"],
        ["--url", "http://[::ffff:169.254.169.254]/"],
        ["--event-type", ""],
        ["--rate-limit", "0"],
        ["--rate-limit", "nan"],
        ["--rate-limit", "5", "--burst", "0"],
        ["--max-in-flight", "0"],
        ["--header", "X-A: a\r\nEvil: b"],
        ["--header", "Content-Type: text/plain"],
        ["--header", "X-A: 1", "--header", "X-A: 2"],
    ],
)
def test_endpoints_update_refused(any_db: str, capsys: pytest.CaptureFixture[str],
                                  args: list[str]) -> None:
    before = _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--header", "X-K: v",
                  "--rate-limit", "3")
    _assert_error(_run(capsys, "endpoints", "update", "ep-1", *args))
    assert _show(capsys, "ep-1", "--show-secret") == before


def test_endpoints_update_burst_alone_keeps_the_rate(any_db: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--rate-limit", "10")
    code, out, _ = _run(capsys, "endpoints", "update", "ep-1", "--burst", "5", "--json")
    ep = json.loads(out) if code == 0 else {}
    # Either it keeps the rate and takes the burst, or it refuses: never drops the limit.
    assert (code, ep.get("rate_limit"), ep.get("rate_burst")) == (0, 10.0, 5) or code == 2
    assert _show(capsys, "ep-1")["rate_limit"] == 10.0


# -- delete, enable, disable ------------------------------------------------------------------


def _seed_deliveries(url: str, rows: list[dict[str, Any]] | None = None) -> None:
    now = datetime.now(UTC)
    base = {"endpoint_id": "ep-1", "event_type": None, "idempotency_key": None, "payload": b"{}",
            "attempts": 0, "next_attempt_at": None, "locked_until": None,
            "last_status_code": None, "last_error": None, "created_at": now, "updated_at": now}
    rows = rows or [
        {"id": "p1", "status": "pending", "next_attempt_at": now + timedelta(hours=1)},
        {"id": "p2", "status": "pending", "next_attempt_at": now + timedelta(hours=1)},
        {"id": "s1", "status": "succeeded"},
        {"id": "f1", "status": "failed", "attempts": 4},
        {"id": "f2", "status": "failed", "attempts": 4},
        {"id": "r1", "status": "rejected"},
    ]

    async def put(store: Store) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(insert(deliveries), [{**base, **r} for r in rows])

    _with_store(url, put)


def _statuses(url: str) -> dict[str, tuple[str, datetime | None]]:
    async def read(store: Store) -> dict[str, tuple[str, datetime | None]]:
        async with store.engine.connect() as conn:
            rows = await conn.execute(select(deliveries.c.id, deliveries.c.status,
                                             deliveries.c.next_attempt_at))
            return {row.id: (row.status, row.next_attempt_at) for row in rows}

    return _with_store(url, read)


def test_endpoints_delete(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    _add(capsys, "--url", "https://b.example/", "--id", "ep-2")
    _seed_deliveries(any_db)
    code, out, err = _run(capsys, "endpoints", "delete", "ep-1", "--json")
    assert code == 0, err
    assert json.loads(out) == {"id": "ep-1", "deleted": True}
    assert [ep["id"] for ep in _list(capsys)] == ["ep-2"]
    # The delivery history stays.
    assert len(_statuses(any_db)) == 6
    _assert_error(_run(capsys, "endpoints", "delete", "ep-1"))
    _assert_error(_run(capsys, "endpoints", "show", "ep-1"))

    code, out, _ = _run(capsys, "endpoints", "delete", "ep-2")
    assert (code, out) == (0, "endpoint ep-2 deleted (its delivery history stays until "
                              "retention)\n")
    assert _list(capsys) == []
    # The id is free again.
    _add(capsys, "--url", "https://c.example/", "--id", "ep-1")


def test_endpoints_disable_enable(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1")
    code, out, _ = _run(capsys, "endpoints", "disable", "ep-1", "--reason", "x")
    assert (code, out) == (
        0, "endpoint ep-1 disabled; its new and due deliveries are held until enabled\n")
    (ep,) = _list(capsys)
    assert (ep["enabled"], ep["disabled_reason"]) == (False, "x")
    assert "ep-1\tdisabled (x)\t" in _run(capsys, "endpoints", "list")[1]

    code, out, _ = _run(capsys, "endpoints", "enable", "ep-1")
    assert (code, out) == (0, "endpoint ep-1 enabled; 0 held deliveries resumed\n")
    (ep,) = _list(capsys)
    assert (ep["enabled"], ep["disabled_reason"]) == (True, None)

    assert _run(capsys, "endpoints", "disable", "ep-1")[0] == 0
    (ep,) = _list(capsys)
    assert (ep["enabled"], ep["disabled_reason"]) == (False, "disabled by operator")

    _assert_error(_run(capsys, "endpoints", "disable", "nope"))
    _assert_error(_run(capsys, "endpoints", "enable", "nope"))


def test_endpoints_enable_resumes_held_deliveries(any_db: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    _add(capsys, "--url", "https://b.example/", "--id", "ep-2")
    later = datetime.now(UTC) + timedelta(hours=1)
    _seed_deliveries(any_db, [
        {"id": "h1", "status": "held", "next_attempt_at": later},
        {"id": "h2", "status": "held", "next_attempt_at": later},
        {"id": "p1", "status": "pending", "next_attempt_at": later},
        {"id": "f1", "status": "failed"},
        {"id": "h3", "status": "held", "endpoint_id": "ep-2", "next_attempt_at": later},
    ])
    code, out, err = _run(capsys, "endpoints", "disable", "ep-1", "--reason", "x", "--json")
    assert code == 0, err
    assert json.loads(out) == {"id": "ep-1", "enabled": False, "resumed": 0}
    assert _show(capsys, "ep-1")["disabled_reason"] == "x"

    before = datetime.now(UTC)
    code, out, err = _run(capsys, "endpoints", "enable", "ep-1", "--json")
    assert code == 0, err
    assert json.loads(out) == {"id": "ep-1", "enabled": True, "resumed": 2}
    after = _statuses(any_db)
    for held in ("h1", "h2"):
        status, due = after[held]
        assert status == "pending"
        assert due is not None
        assert before - timedelta(seconds=1) <= due <= datetime.now(UTC)
    status, due = after["p1"]
    assert status == "pending"
    assert due is not None and abs((due - later).total_seconds()) < 1  # not moved
    assert after["f1"][0] == "failed"
    assert after["h3"][0] == "held"  # another endpoint's

    code, out, _ = _run(capsys, "endpoints", "enable", "ep-1")
    assert (code, out) == (0, "endpoint ep-1 enabled; 0 held deliveries resumed\n")
    code, out, _ = _run(capsys, "endpoints", "enable", "ep-2", "--json")
    assert json.loads(out)["resumed"] == 1


@pytest.mark.parametrize("argv", [
    ["show", "nope"],
    ["show", "nope", "--json"],
    ["update", "nope", "--description", "d"],
    ["update", "nope", "--header", "X-A: 1"],
    ["update", "nope", "--clear-headers", "--json"],
    ["delete", "nope"],
    ["delete", "nope", "--json"],
    ["enable", "nope", "--json"],
    ["disable", "nope", "--json"],
    ["rotate-secret", "nope"],
    ["rotate-secret", "nope", "--json"],
])
def test_unknown_endpoint_is_one_line(any_db: str, capsys: pytest.CaptureFixture[str],
                                      argv: list[str]) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    line = _assert_error(_run(capsys, "endpoints", *argv))
    assert "'nope'" in line
    assert [ep["id"] for ep in _list(capsys)] == ["ep-1"]


# -- rotate-secret ---------------------------------------------------------------------------


def test_endpoints_rotate_secret(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    first = generate_secret()
    _run(capsys, "endpoints", "add", "--url", "https://a.example/", "--id", "ep-1",
         "--secret", first)

    before = datetime.now(UTC)
    code, out, err = _run(capsys, "endpoints", "rotate-secret", "ep-1")
    assert code == 0, err
    (second,) = _printed(out, "secret")
    assert second != first and len(secret_key(second)) >= 24
    assert first not in out
    assert "and 1 previous secret(s) for their overlap (86400s)" in out
    ep = _show(capsys, "ep-1", "--show-secret")
    new, kept = ep["secrets"]
    assert new == {"scheme": "v1", "signs_until": None, "secret": second}
    assert kept["secret"] == first
    # The old one keeps signing for WEBHOOKS_SECRET_OVERLAP (86400 s by default), then stops.
    assert _near(kept["signs_until"], before + timedelta(seconds=86400))
    stored = _with_store(any_db, lambda s: s.get_endpoint("ep-1"))
    now = datetime.now(UTC)
    assert stored.signing_secrets(now) == (second, first)
    assert stored.signing_secrets(now + timedelta(seconds=86401)) == (second,)
    # Without --show-secret: the schedule, no values.
    assert _show(capsys, "ep-1")["secrets"] == [
        {"scheme": "v1", "signs_until": None},
        {"scheme": "v1", "signs_until": kept["signs_until"]}]

    third = generate_secret()
    code, out, _ = _run(capsys, "endpoints", "rotate-secret", "ep-1", "--secret", third,
                        "--drop-old")
    assert code == 0
    assert "and nothing else" in out
    assert _secret_values(_show(capsys, "ep-1", "--show-secret")) == [third]

    _assert_error(_run(capsys, "endpoints", "rotate-secret", "ep-1", "--secret", "whsec_x"))
    _assert_error(_run(capsys, "endpoints", "rotate-secret", "ep-1", "--overlap=-1"))
    assert _secret_values(_show(capsys, "ep-1", "--show-secret")) == [third]
    _assert_error(_run(capsys, "endpoints", "rotate-secret", "nope"))


def test_endpoints_rotate_secret_overlap(any_db: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    before = datetime.now(UTC)
    assert _run(capsys, "endpoints", "rotate-secret", "ep-1", "--overlap", "60")[0] == 0
    assert _near(_show(capsys, "ep-1")["secrets"][1]["signs_until"],
                 before + timedelta(seconds=60))

    _set_env(monkeypatch, "WEBHOOKS_SECRET_OVERLAP", "600")
    _add(capsys, "--url", "https://b.example/", "--id", "ep-2")
    before = datetime.now(UTC)
    code, out, _ = _run(capsys, "endpoints", "rotate-secret", "ep-2")
    assert code == 0 and "(600s)" in out
    assert _near(_show(capsys, "ep-2")["secrets"][1]["signs_until"],
                 before + timedelta(seconds=600))

    # An overlap of 0 is --drop-old.
    assert _run(capsys, "endpoints", "rotate-secret", "ep-2", "--overlap", "0")[0] == 0
    assert len(_show(capsys, "ep-2")["secrets"]) == 1


def test_endpoints_rotate_secret_keeps_at_most_three_old_ones(
    any_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    newest = []
    for _ in range(5):
        code, out, _ = _run(capsys, "endpoints", "rotate-secret", "ep-1")
        assert code == 0
        newest.insert(0, _printed(out, "secret")[0])
    assert _secret_values(_show(capsys, "ep-1", "--show-secret")) == newest[:4]


def test_endpoints_rotate_secret_v1a_and_json(any_db: str, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    first = generate_secret()
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--secret", first,
         "--header", "X-K: v")
    code, out, err = _run(capsys, "endpoints", "rotate-secret", "ep-1", "--scheme", "v1a")
    assert code == 0, err
    (public,) = _printed(out, "public key")
    (signing,) = _printed(out, "signing key")
    assert first not in out
    ep = _show(capsys, "ep-1", "--show-secret")
    assert [(s["scheme"], s["secret"]) for s in ep["secrets"]] == [("v1a", signing),
                                                                   ("v1", first)]
    assert ep["public_keys"] == [public]
    assert ep["headers"] == {"X-K": "v"}  # a rotation keeps the headers

    code, out, err = _run(capsys, "endpoints", "rotate-secret", "ep-1", "--json",
                          "--overlap", "30")
    assert code == 0, err
    ep = json.loads(out)
    assert set(ep) == ENDPOINT_FIELDS
    assert [s["scheme"] for s in ep["secrets"]] == ["v1", "v1a", "v1"]
    assert ep["secrets"][0]["signs_until"] is None
    fresh = ep["secrets"][0]["secret"]
    assert fresh not in (first, signing) and len(secret_key(fresh)) >= 24
    assert _secret_values(_show(capsys, "ep-1", "--show-secret"))[0] == fresh


@pytest.mark.parametrize("overlap", ["inf", "1e12", "nan"])
def test_endpoints_rotate_secret_refuses_unusable_overlap(
    any_db: str, capsys: pytest.CaptureFixture[str], overlap: str
) -> None:
    ep = _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    _assert_error(_run(capsys, "endpoints", "rotate-secret", "ep-1", "--overlap", overlap))
    assert _show(capsys, "ep-1", "--show-secret")["secrets"] == ep["secrets"]


# -- keys ------------------------------------------------------------------------------------


def test_keys_generate(cli_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "keys", "generate")
    assert code == 0, err
    assert len(out.splitlines()) == 1
    ring = KeyRing.parse(out)
    assert len(ring.keys) == 1 and len(ring.keys[0][1]) == 32
    assert out != _run(capsys, "keys", "generate")[1]

    code, out, _ = _run(capsys, "keys", "generate", "--key-id", "prod-2026")
    assert code == 0
    assert out.startswith("prod-2026:")
    assert KeyRing.parse(out).sealing_key_id == "prod-2026"

    _assert_error(_run(capsys, "keys", "generate", "--key-id", "has space"))
    _assert_error(_run(capsys, "keys", "generate", "--key-id", "a.b"))


def test_keys_generate_needs_no_key(pg_url: str, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # It is what the missing-key error tells the operator to run.
    _no_key(monkeypatch)
    code, out, err = _run(capsys, "keys", "generate")
    assert (code, err) == (0, "")
    KeyRing.parse(out)


def test_keys_status(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    kid = _kid(os.environ["WEBHOOKS_SECRET_KEYS"])
    code, out, err = _run(capsys, "keys", "status", "--json")
    assert code == 0, err
    assert json.loads(out) == {"sealing_key": kid, "keys": [kid], "endpoints_by_key": {}}
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    _add(capsys, "--url", "https://b.example/", "--id", "ep-2")
    code, out, _ = _run(capsys, "keys", "status", "--json")
    assert json.loads(out) == {"sealing_key": kid, "keys": [kid], "endpoints_by_key": {kid: 2}}
    code, out, _ = _run(capsys, "keys", "status")
    assert code == 0
    assert out.splitlines()[0] == f"sealing key {kid}; keys held: {kid}"
    assert out.splitlines()[1].split() == [kid, "2", "endpoints"]
    assert "NOT IN THE RING" not in out


def test_keys_rotate_reseals_under_the_first_key(
    any_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old_ring = os.environ["WEBHOOKS_SECRET_KEYS"]
    old = _kid(old_ring)
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--header", "X-K: header-v")
    _add(capsys, "--url", "https://b.example/", "--id", "ep-2", "--scheme", "v1a")
    _add(capsys, "--url", "https://c.example/", "--id", "ep-3", "--scheme", "both")
    _run(capsys, "endpoints", "rotate-secret", "ep-3")
    before = {ep["id"]: ep for ep in _list(capsys, "--show-secret")}
    assert len(before) == 3
    tokens_before = _raw_credentials(any_db)

    new_item = generate_key("next")
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEYS", f"{new_item},{old_ring}")
    code, out, _ = _run(capsys, "keys", "status", "--json")
    assert json.loads(out) == {"sealing_key": "next", "keys": ["next", old],
                               "endpoints_by_key": {old: 3}}

    code, out, err = _run(capsys, "keys", "rotate", "--chunk", "2", "--json")
    assert code == 0, err
    assert json.loads(out) == {"sealing_key": "next", "resealed": 3}
    code, out, _ = _run(capsys, "keys", "status", "--json")
    assert json.loads(out)["endpoints_by_key"] == {"next": 3}
    tokens = _raw_credentials(any_db)
    assert all(t.startswith("sealed1.next.") for t in tokens.values())
    assert all(tokens[i] != tokens_before[i] for i in tokens)
    # The same secrets, schedules and headers, under the new key.
    assert {ep["id"]: ep for ep in _list(capsys, "--show-secret")} == before

    # Again: nothing left to do.
    code, out, _ = _run(capsys, "keys", "rotate")
    assert (code, out) == (0, "0 endpoints re-sealed under key next\n")

    # The old key can go now.
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEYS", new_item)
    after = {ep["id"]: ep for ep in _list(capsys, "--show-secret")}
    assert after == before
    assert all(ep["credential_error"] is None for ep in after.values())
    code, out, _ = _run(capsys, "keys", "status", "--json")
    assert json.loads(out) == {"sealing_key": "next", "keys": ["next"],
                               "endpoints_by_key": {"next": 3}}
    # New endpoints are sealed under it too.
    _add(capsys, "--url", "https://d.example/", "--id", "ep-4")
    assert _raw_credentials(any_db)["ep-4"].startswith("sealed1.next.")


def test_keys_rotate_plain_output(any_db: str, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEYS",
             f"{generate_key('k2')},{os.environ['WEBHOOKS_SECRET_KEYS']}")
    code, out, _ = _run(capsys, "keys", "rotate")
    assert (code, out) == (0, "1 endpoints re-sealed under key k2\n")
    with pytest.raises(SystemExit) as exited:  # argparse refuses a chunk below 1
        main(["keys", "rotate", "--chunk", "0"])
    assert exited.value.code == 2
    assert "must be 1 or more" in capsys.readouterr().err


def test_a_ring_without_the_sealing_key_reports_credential_error(
    any_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old_ring = os.environ["WEBHOOKS_SECRET_KEYS"]
    old = _kid(old_ring)
    secret = generate_secret()
    _add(capsys, "--url", "https://a.example/", "--id", "ep-1", "--secret", secret,
         "--header", "X-K: header-v")
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEYS", generate_key("other"))

    ep = _show(capsys, "ep-1", "--show-secret")
    assert ep["credential_error"] is not None
    assert repr(old) in ep["credential_error"]
    assert (ep["secrets"], ep["headers"], ep["public_keys"]) == ([], {}, [])
    assert ep["url"] == "https://a.example/"
    code, out, err = _run(capsys, "endpoints", "show", "ep-1")
    assert code == 0, err
    (error_line,) = [line for line in out.splitlines() if "ERROR" in line]
    assert repr(old) in error_line
    (listed,) = _list(capsys)
    assert listed["credential_error"] == ep["credential_error"]
    assert _run(capsys, "endpoints", "list")[0] == 0

    code, out, _ = _run(capsys, "keys", "status")
    assert code == 0
    assert f"{old}" in out and "NOT IN THE RING" in out
    # Re-sealing cannot open it: one line, and the row is left as it was.
    token = _raw_credentials(any_db)["ep-1"]
    line = _assert_error(_run(capsys, "keys", "rotate"))
    assert repr(old) in line
    assert _raw_credentials(any_db)["ep-1"] == token
    # Changing its credentials cannot open them either; plain settings still change.
    _assert_error(_run(capsys, "endpoints", "rotate-secret", "ep-1"))
    _assert_error(_run(capsys, "endpoints", "update", "ep-1", "--clear-headers"))
    assert _run(capsys, "endpoints", "update", "ep-1", "--description", "d")[0] == 0

    # With the key back, everything is as it was.
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEYS", f"{generate_key('third')},{old_ring}")
    ep = _show(capsys, "ep-1", "--show-secret")
    assert ep["credential_error"] is None
    assert _secret_values(ep) == [secret]
    assert ep["headers"] == {"X-K": "header-v"}


@pytest.mark.parametrize("argv", [
    ["endpoints", "list"],
    ["endpoints", "list", "--json"],
    ["endpoints", "show", "ep-1"],
    ["endpoints", "add", "--url", "https://a.example/"],
    ["endpoints", "update", "ep-1", "--description", "d"],
    ["endpoints", "delete", "ep-1"],
    ["endpoints", "enable", "ep-1"],
    ["endpoints", "rotate-secret", "ep-1"],
    ["keys", "status"],
    ["keys", "rotate"],
    ["deliveries", "stats"],
    ["deliveries", "list"],
    ["deliveries", "replay", "--failed"],
])
def test_postgresql_without_a_key_is_one_line(
    pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str]
) -> None:
    _no_key(monkeypatch)
    line = _assert_error(_run(capsys, *argv))
    assert HOW_TO_GET_A_KEY in line
    assert "WEBHOOKS_SECRET_KEYS" in line


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_with_a_key_file(any_db: str, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key_file = tmp_path / "ring.key"
    key_file.write_text(generate_key("from-file") + "\n")
    _no_key(monkeypatch)
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEY_FILE", str(key_file))
    ep = _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    assert _raw_credentials(any_db)["ep-1"].startswith("sealed1.from-file.")
    assert _show(capsys, "ep-1", "--show-secret") == ep
    code, out, _ = _run(capsys, "keys", "status", "--json")
    assert code == 0
    assert json.loads(out)["endpoints_by_key"] == {"from-file": 1}

    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEY_FILE", str(tmp_path / "missing.key"))
    line = _assert_error(_run(capsys, "endpoints", "list"))
    assert "missing.key" in line


@pytest.mark.parametrize("ring", [
    pytest.param("garbage", id="no-colon"),
    pytest.param("k1:tooshort", id="short-key"),
    pytest.param("k1:" + "A" * 43 + "=,k1:" + "B" * 43 + "=", id="same-id-twice"),
    pytest.param(",", id="empty-item"),
    pytest.param("bad id:x", id="bad-id"),
])
def test_a_malformed_key_ring_is_one_line(any_db: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch, ring: str) -> None:
    _set_env(monkeypatch, "WEBHOOKS_SECRET_KEYS", ring)
    line = _assert_error(_run(capsys, "endpoints", "list"))
    assert "WEBHOOKS_SECRET_KEYS" in line
    # Key material is never echoed back.
    assert "A" * 43 not in line and "B" * 43 not in line


def test_sqlite_without_a_key_makes_a_key_file(db: str, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    _no_key(monkeypatch)
    key_file = tmp_path / "cli.db.key"
    assert not key_file.exists()
    ep = _add(capsys, "--url", "https://a.example/", "--id", "ep-1")
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    content = key_file.read_text()
    kid = KeyRing.parse(content, "file").sealing_key_id
    assert _raw_credentials(db)["ep-1"].startswith(f"sealed1.{kid}.")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    # The next run reuses it: the same key, and the endpoint opens.
    get_settings.cache_clear()
    assert _show(capsys, "ep-1", "--show-secret") == ep
    code, out, _ = _run(capsys, "keys", "status", "--json")
    assert code == 0
    assert json.loads(out) == {"sealing_key": kid, "keys": [kid],
                               "endpoints_by_key": {kid: 1}}
    assert key_file.read_text() == content
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # It is the key file that opens it: a new file (new key) does not.
    key_file.unlink()
    assert _show(capsys, "ep-1")["credential_error"] is not None
    assert key_file.read_text() != content


# -- deliveries ------------------------------------------------------------------------------


def test_deliveries_stats(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "deliveries", "stats", "--json")
    assert (code, json.loads(out)) == (0, {})
    _seed_deliveries(any_db)
    code, out, _ = _run(capsys, "deliveries", "stats", "--json")
    assert code == 0
    assert json.loads(out) == {"pending": 2, "succeeded": 1, "failed": 2, "rejected": 1}
    code, out, _ = _run(capsys, "deliveries", "stats")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["pending", "2"], ["held", "0"], ["succeeded", "1"], ["failed", "2"], ["rejected", "1"]]


def test_deliveries_replay(any_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_deliveries(any_db)
    _assert_error(_run(capsys, "deliveries", "replay"))
    _assert_error(_run(capsys, "deliveries", "replay", "--endpoint", "ep-1"))

    # s1 succeeded: it cannot be replayed (resend it), so the exit status says so; f1 still is.
    code, out, err = _run(capsys, "deliveries", "replay", "--id", "f1", "--id", "s1")
    assert code == 2
    assert "s1" in err and "resend" in err
    assert _with_store(any_db, lambda s: s.delivery_statuses(["f1"]))["f1"][0] == "pending"
    code, out, _ = _run(capsys, "deliveries", "replay", "--failed", "--endpoint", "other")
    assert (code, out.split()[0]) == (0, "0")
    code, out, _ = _run(capsys, "deliveries", "replay", "--failed")
    assert (code, out.split()[0]) == (0, "1")
    counts = _with_store(any_db, lambda s: s.status_counts())
    assert counts == {"pending": 4, "succeeded": 1, "rejected": 1}


def test_deliveries_list_filters_by_status_and_endpoint(
    any_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_deliveries(any_db)
    code, out, _ = _run(capsys, "deliveries", "list", "--status", "failed", "--json")
    assert code == 0
    rows = json.loads(out)
    assert sorted(r["id"] for r in rows) == ["f1", "f2"]
    assert all("payload" not in r for r in rows)
    code, out, _ = _run(capsys, "deliveries", "list", "--endpoint", "nobody")
    assert (code, out.strip()) == (0, "no deliveries")
    code, out, _ = _run(capsys, "deliveries", "list", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 3  # a header and two rows


def test_a_malformed_setting_is_one_line(db: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _set_env(monkeypatch, "WEBHOOKS_ALLOWED_NETWORKS", "not-a-network")
    line = _assert_error(_run(capsys, "endpoints", "list"))
    assert "WEBHOOKS_ALLOWED_NETWORKS" in line


# -- endpoints test: one signed test event, now --------------------------------------------------


@pytest.fixture
def test_receiver() -> Iterator[dict[str, Any]]:
    """A real HTTP server on 127.0.0.1 in a thread: /ok answers 200, /bad 500."""
    import asyncio
    import threading

    from aiohttp import web

    state: dict[str, Any] = {"seen": []}
    started = threading.Event()

    async def handle(request: web.Request) -> web.Response:
        state["seen"].append((request.path, dict(request.headers), await request.read()))
        return web.Response(status=200 if request.path == "/ok" else 500, text="ack")

    def serve() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        state["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield state
    state["loop"].call_soon_threadsafe(state["loop"].stop)
    thread.join(10)


def test_endpoints_test_sends_one_signed_event_and_shows_the_attempt(
        db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        test_receiver: dict[str, Any]) -> None:
    from standardwebhooks import Webhook

    _set_env(monkeypatch, "WEBHOOKS_ALLOWED_NETWORKS", "127.0.0.0/8")
    port = test_receiver["port"]
    ok = _add(capsys, "--url", f"http://127.0.0.1:{port}/ok", "--id", "ep-ok")
    _add(capsys, "--url", f"http://127.0.0.1:{port}/bad", "--id", "ep-bad")
    code, out, _ = _run(capsys, "endpoints", "test", "ep-ok")
    assert code == 0 and "success (HTTP 200" in out and "response  ack" in out
    path, headers, body = test_receiver["seen"][-1]
    assert path == "/ok"
    secret = ok["secrets"][0]["secret"]
    assert Webhook(secret).verify(body, headers)["type"] == "webhook.test"

    code, out, _ = _run(capsys, "endpoints", "test", "ep-bad", "--json")
    assert code == 1
    report = json.loads(out)
    assert (report["outcome"], report["status"], report["error"]) == ("retry", 500, "HTTP 500")
    _assert_error(_run(capsys, "endpoints", "test", "nope"))
