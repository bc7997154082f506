"""validate_event, validate_url, validate_endpoint_id, validate_event_types."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.core.errors import InvalidEndpoint, InvalidEvent
from worker.core.validation import (
    EVENT_TYPE_MAX,
    IDEMPOTENCY_KEY_MAX,
    MAX_URL_LENGTH,
    ValidEvent,
    event_type_of,
    validate_endpoint_id,
    validate_event,
    validate_event_types,
    validate_url,
)

LIMIT = 1024


def _code(exc: pytest.ExceptionInfo[InvalidEvent]) -> str:
    return exc.value.code


# --- validate_event: the happy path ------------------------------------------------------


def test_validate_event_returns_the_exact_compact_json_body() -> None:
    data = {"type": "order.created", "data": {"id": 1, "name": "café", "ok": True}}
    event = validate_event("ep_1", data, max_payload_bytes=LIMIT)
    assert event == ValidEvent("ep_1", orjson.dumps(data), "order.created", None)
    expected = '{"type":"order.created","data":{"id":1,"name":"café","ok":true}}'
    assert event.payload == expected.encode()


def test_validate_event_keeps_idempotency_key_and_explicit_event_type() -> None:
    event = validate_event("ep", {"type": "a"}, max_payload_bytes=LIMIT,
                           idempotency_key="key-1", event_type="b")
    assert event.idempotency_key == "key-1"
    assert event.event_type == "b"  # explicit type wins over the payload's


def test_validate_event_empty_object_is_a_valid_payload() -> None:
    assert validate_event("ep", {}, max_payload_bytes=2).payload == b"{}"


# --- validate_event: codes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "webhook_id",
    [None, "", 1, b"ep", ["ep"], "-ep", ".ep", "ep 1", "ep/1", "ep@x", "é", "a" * 129, "ep\n"],
    ids=repr,
)
def test_validate_event_rejects_bad_webhook_ids(webhook_id: Any) -> None:
    with pytest.raises(InvalidEvent) as exc:
        validate_event(webhook_id, {}, max_payload_bytes=LIMIT)
    assert _code(exc) == "invalid_webhook_id"


@pytest.mark.parametrize("webhook_id", ["e", "ep_1", "A.b:c-d_e", "0abc", "a" * 128])
def test_validate_event_accepts_good_webhook_ids(webhook_id: str) -> None:
    assert validate_event(webhook_id, {}, max_payload_bytes=LIMIT).webhook_id == webhook_id


@pytest.mark.parametrize("data", [[], [1, 2], "text", '{"a":1}', 1, 1.5, None, True, (1,)],
                         ids=repr)
def test_validate_event_rejects_non_object_payloads(data: Any) -> None:
    with pytest.raises(InvalidEvent) as exc:
        validate_event("ep", data, max_payload_bytes=LIMIT)
    assert _code(exc) == "payload_not_object"


@pytest.mark.parametrize(
    "data",
    [{"a": {1, 2}}, {"a": b"bytes"}, {1: "int key"}, {"a": 2**64}, {"a": object()}],
    ids=["set", "bytes", "int-key", "huge-int", "object"],
)
def test_validate_event_rejects_payloads_that_are_not_json(data: Any) -> None:
    with pytest.raises(InvalidEvent) as exc:
        validate_event("ep", data, max_payload_bytes=LIMIT)
    assert _code(exc) == "payload_not_json"


def _payload_of_size(size: int) -> dict[str, str]:
    # '{"k":"' + x * n + '"}' is n + 8 bytes
    data = {"k": "x" * (size - 8)}
    assert len(orjson.dumps(data)) == size
    return data


@pytest.mark.parametrize("limit", [8, 100, 1024, 262144])
def test_validate_event_accepts_a_payload_of_exactly_max_payload_bytes(limit: int) -> None:
    event = validate_event("ep", _payload_of_size(limit), max_payload_bytes=limit)
    assert len(event.payload) == limit


@pytest.mark.parametrize("limit", [8, 100, 1024, 262144])
def test_validate_event_rejects_a_payload_one_byte_over_max_payload_bytes(limit: int) -> None:
    with pytest.raises(InvalidEvent, match=f"{limit + 1} bytes; the limit is {limit}") as exc:
        validate_event("ep", _payload_of_size(limit + 1), max_payload_bytes=limit)
    assert _code(exc) == "payload_too_large"


def test_validate_event_size_counts_utf8_bytes_not_characters() -> None:
    data = {"k": "é" * 10}  # 20 bytes of text, 28 in all
    assert validate_event("ep", data, max_payload_bytes=28).payload == orjson.dumps(data)
    with pytest.raises(InvalidEvent) as exc:
        validate_event("ep", data, max_payload_bytes=27)
    assert _code(exc) == "payload_too_large"


@pytest.mark.parametrize("key", ["", 1, b"k", ["k"], "k" * (IDEMPOTENCY_KEY_MAX + 1)], ids=repr)
def test_validate_event_rejects_bad_idempotency_keys(key: Any) -> None:
    with pytest.raises(InvalidEvent) as exc:
        validate_event("ep", {}, max_payload_bytes=LIMIT, idempotency_key=key)
    assert _code(exc) == "invalid_idempotency_key"


@pytest.mark.parametrize("key", [None, "k", "k" * IDEMPOTENCY_KEY_MAX, "a b/c:d"])
def test_validate_event_accepts_idempotency_keys_up_to_the_limit(key: str | None) -> None:
    event = validate_event("ep", {}, max_payload_bytes=LIMIT, idempotency_key=key)
    assert event.idempotency_key == key


@pytest.mark.parametrize("event_type", ["", 7, ["a"], "t" * (EVENT_TYPE_MAX + 1)],
                         ids=repr)
def test_validate_event_rejects_bad_explicit_event_types(event_type: Any) -> None:
    with pytest.raises(InvalidEvent) as exc:
        validate_event("ep", {}, max_payload_bytes=LIMIT, event_type=event_type)
    assert _code(exc) == "invalid_event_type"


def test_validate_event_accepts_an_explicit_event_type_at_the_limit() -> None:
    event_type = "t" * EVENT_TYPE_MAX
    assert validate_event("ep", {}, max_payload_bytes=LIMIT,
                          event_type=event_type).event_type == event_type


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"webhook_id": "", "event_data": [], "idempotency_key": ""}, "invalid_webhook_id"),
        ({"webhook_id": "ep", "event_data": [], "idempotency_key": ""}, "invalid_idempotency_key"),
        ({"webhook_id": "ep", "event_data": [], "event_type": ""}, "invalid_event_type"),
    ],
)
def test_validate_event_reports_the_first_problem_in_a_fixed_order(
    kwargs: dict[str, Any], code: str
) -> None:
    with pytest.raises(InvalidEvent) as exc:
        validate_event(max_payload_bytes=LIMIT, **kwargs)
    assert _code(exc) == code


def test_invalid_event_is_a_value_error_with_a_message() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        validate_event("ep", [], max_payload_bytes=LIMIT)


# --- event_type_of -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"type": "a.b"}, "a.b"),
        ({"event": "c.d"}, "c.d"),
        ({"type": "a", "event": "b"}, "a"),
        ({"event": "b", "type": "a"}, "a"),
        ({"type": "", "event": "b"}, "b"),
        ({"type": 5, "event": "b"}, "b"),
        ({"type": None, "event": "b"}, "b"),
        ({"type": ["a"]}, None),
        ({"event": ""}, None),
        ({}, None),
        ({"kind": "x"}, None),
    ],
)
def test_event_type_of_picks_type_then_event(data: dict[str, Any], expected: str | None) -> None:
    assert event_type_of(data) == expected


def test_event_type_of_truncates_to_the_event_type_limit() -> None:
    assert event_type_of({"type": "t" * 1000}) == "t" * EVENT_TYPE_MAX


def test_validate_event_takes_the_event_type_from_the_payload_when_not_given() -> None:
    assert validate_event("ep", {"event": "x.y"}, max_payload_bytes=LIMIT).event_type == "x.y"
    assert validate_event("ep", {"n": 1}, max_payload_bytes=LIMIT).event_type is None


# --- validate_url ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com",
        "https://example.com/hooks?x=1&y=2",
        "http://example.com:8080/path",
        "https://127.0.0.1/hook",
        "https://[2606:4700:4700::1111]:443/h",
        "https://a:1/",
        "https://a:65535/",
        "HTTPS://Example.COM/",
    ],
)
def test_validate_url_accepts_and_returns_absolute_http_urls_unchanged(url: str) -> None:
    assert validate_url(url) == url


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://example.com/", "must use https or http"),
        ("file:///etc/passwd", "must use https or http"),
        ("ws://example.com/", "must use https or http"),
        ("javascript:alert(1)", "must use https or http"),
        ("//example.com/x", "must use https or http"),
        ("example.com/x", "must use https or http"),
        ("https:///path", "has no host"),
        ("http:example.com", "has no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://user@example.com/", "credentials"),
        ("https://:pw@example.com/", "credentials"),
        ("https://example.com:0/", "port 0"),
        ("https://example.com:65536/", "malformed"),
        ("https://example.com:99999/", "malformed"),
        ("https://example.com:abc/", "malformed"),
        ("https://example.com:-1/", "malformed"),
        ("https://[::1/", "malformed"),
        ("https://example.com/#frag", "fragment"),
        ("https://example.com/a b", "white space"),
        (" https://example.com/", "white space"),
        ("https://example.com/\t", "white space"),
        ("https://example.com/\n", "white space"),
        ("https://example.com/\u3000", "white space"),
        ("", r"1\.\.2048"),
    ],
)
def test_validate_url_rejects_bad_urls_with_a_clear_reason(url: str, match: str) -> None:
    with pytest.raises(InvalidEndpoint, match=match):
        validate_url(url)


@pytest.mark.parametrize("value", [None, 1, b"https://example.com/"], ids=repr)
def test_validate_url_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidEndpoint, match="string"):
        validate_url(value)


def test_validate_url_length_limit_is_inclusive() -> None:
    base = "https://example.com/"
    at_limit = base + "a" * (MAX_URL_LENGTH - len(base))
    assert len(at_limit) == MAX_URL_LENGTH
    assert validate_url(at_limit) == at_limit
    with pytest.raises(InvalidEndpoint, match=r"1\.\.2048"):
        validate_url(at_limit + "a")


def test_validate_url_allow_http_false_refuses_plain_http() -> None:
    assert validate_url("https://example.com/", allow_http=False) == "https://example.com/"
    with pytest.raises(InvalidEndpoint, match=r"must use https$"):
        validate_url("http://example.com/", allow_http=False)


# --- validate_endpoint_id ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["e", "0", "ep_1", "a.b:c-d_e", "A" * 128, "ep-01HZX"])
def test_validate_endpoint_id_accepts_and_returns_good_ids(value: str) -> None:
    assert validate_endpoint_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "_a", "-a", ".a", ":a", "a b", "a/b", "a@b", "é", "a" * 129, "a\n", "a\r\n", "\na"],
    ids=repr,
)
def test_validate_endpoint_id_rejects_bad_ids(value: str) -> None:
    with pytest.raises(InvalidEndpoint, match="endpoint id"):
        validate_endpoint_id(value)


# --- validate_event_types ----------------------------------------------------------------


@pytest.mark.parametrize("values", [None, (), []], ids=repr)
def test_validate_event_types_empty_means_all_and_is_an_empty_tuple(values: Any) -> None:
    assert validate_event_types(values) == ()


@pytest.mark.parametrize("values", ["", "abc"])
def test_validate_event_types_refuses_a_bare_string(values: str) -> None:
    with pytest.raises(InvalidEndpoint, match="not one string"):
        validate_event_types(values)


def test_validate_event_types_dedups_and_keeps_first_seen_order() -> None:
    got = validate_event_types(["b", "a", "b", "c", "a"])
    assert got == ("b", "a", "c")


def test_validate_event_types_accepts_any_iterable() -> None:
    assert validate_event_types(iter(["x", "y", "x"])) == ("x", "y")


def test_validate_event_types_accepts_the_length_limit() -> None:
    assert validate_event_types(["t" * EVENT_TYPE_MAX]) == ("t" * EVENT_TYPE_MAX,)


@pytest.mark.parametrize(
    "values",
    [[""], ["a", ""], [1], ["a", None], ["t" * (EVENT_TYPE_MAX + 1)]],
    ids=repr,
)
def test_validate_event_types_rejects_empty_long_or_non_string_entries(values: Any) -> None:
    with pytest.raises(InvalidEndpoint, match="event type"):
        validate_event_types(values)
