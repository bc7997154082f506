"""The hardened Redis transport: what stock kombu would stop the worker on."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import pytest
from kombu.transport import redis as kombu_redis

from worker.transport import TolerantQoS, _repaired, decode_body


def test_a_failed_restore_at_channel_close_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Kombu restores unacked messages while closing a channel whose connection just failed,
    and finds its client released (seen in the Redis-restart fault test: the worker exited)."""

    def released(self: Any, client: Any = None) -> None:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    monkeypatch.setattr(kombu_redis.QoS, "restore_unacked", released)
    qos = object.__new__(TolerantQoS)
    qos._delivered = OrderedDict(tag1="m1", tag2="m2")
    with caplog.at_level(logging.WARNING, logger="webhooks.transport"):
        qos.restore_unacked()
    assert qos._delivered == {}
    assert "could not hand 2 unacknowledged messages back" in caplog.text


def test_an_ack_on_a_channel_closed_by_a_reconnect_is_skipped_not_fatal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen in the Redis-restart fault test under CI: a commit landed after the reconnect,
    its ack went to the old channel, and kombu's AttributeError stopped the worker."""

    def released(self: Any, delivery_tag: str) -> None:
        raise AttributeError("'NoneType' object has no attribute 'client'")

    monkeypatch.setattr(kombu_redis.QoS, "ack", released)
    qos = object.__new__(TolerantQoS)
    with caplog.at_level(logging.INFO, logger="webhooks.transport"):
        qos.ack("tag-1")
    assert "ack of tag-1 skipped" in caplog.text


@pytest.mark.parametrize("payload", [["a", 1], "text", {"body": "eyJ9", "headers": "h"},
                                     {"properties": "p", "body": 7}])
def test_a_damaged_envelope_is_repaired_with_its_body_left_undecoded(payload: Any) -> None:
    fixed = _repaired(payload)
    assert isinstance(fixed["properties"]["delivery_tag"], str)
    assert fixed["properties"]["body_encoding"] is None
    assert isinstance(fixed["headers"], dict)
    assert isinstance(fixed["body"], str | bytes)


def test_decode_body_refuses_nan_and_infinity_but_reads_kombu_json() -> None:
    assert decode_body(b'[[], {"a": 1}, {}]', "application/json", "utf-8") == [[], {"a": 1}, {}]
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(ValueError, match="is not JSON"):
            decode_body(b'{"x": ' + constant + b"}", "application/json", "utf-8")
