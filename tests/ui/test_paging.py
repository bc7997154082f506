"""worker.ui.paging: keyset cursors and list filters, without I/O."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.ui.paging import (
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    BadQuery,
    Cursor,
    DeliveryFilter,
    decode_cursor,
    encode_cursor,
    page_size,
)


def test_cursor_round_trip_keeps_microseconds_and_utc() -> None:
    when = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
    cursor = Cursor(when, "msg_abc|with-bar")
    back = decode_cursor(encode_cursor(cursor))
    assert back == cursor and back.created_at.tzinfo is not None
    east = datetime(2026, 11, 25, 14, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert decode_cursor(encode_cursor(Cursor(east, "x"))).created_at == east
    assert "=" not in encode_cursor(cursor)


@pytest.mark.parametrize("text", [
    "", "!!!", base64.urlsafe_b64encode(b"no-separator").decode(),
    base64.urlsafe_b64encode(b"2026-11-25T12:00:00|").decode(),  # no id
    base64.urlsafe_b64encode(b"2026-11-25T12:00:00|x").decode(),  # naive time
    base64.urlsafe_b64encode(b"yesterday+00:00|x").decode(),
    base64.urlsafe_b64encode(b"2026-11-25T12:00:00+00:00|" + b"x" * 41).decode(),
    base64.urlsafe_b64encode(b"\xff\xfe|x").decode(),
])
def test_malformed_cursors_are_refused(text: str) -> None:
    with pytest.raises(BadQuery):
        decode_cursor(text)


def test_filter_checks_status_and_window_and_gives_its_query() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    f = DeliveryFilter(status="failed", endpoint_id="ep", event_type=None, since=since)
    assert f.query() == {"status": "failed", "endpoint": "ep", "since": since.isoformat()}
    assert DeliveryFilter().query() == {}
    with pytest.raises(BadQuery, match="status"):
        DeliveryFilter(status="lost")
    with pytest.raises(BadQuery, match="before"):
        DeliveryFilter(since=since, until=since)


def test_page_size() -> None:
    assert page_size(None) == page_size("") == PAGE_SIZE
    assert page_size("1") == 1 and page_size(str(MAX_PAGE_SIZE)) == MAX_PAGE_SIZE
    for bad in ("0", str(MAX_PAGE_SIZE + 1), "-1", "ten", "1e3"):
        with pytest.raises(BadQuery):
            page_size(bad)
