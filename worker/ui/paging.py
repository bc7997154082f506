"""Keyset cursors and list filters for the deliveries pages. Pure: no I/O."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.core.models import DeliveryStatus

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
STATUSES = tuple(s.value for s in DeliveryStatus)


class BadQuery(ValueError):
    """A query string the list cannot take; the message is shown to the user."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the last row's (created_at, id); the next page is older."""

    created_at: datetime
    id: str


def encode_cursor(cursor: Cursor) -> str:
    text = f"{cursor.created_at.astimezone(UTC).isoformat()}|{cursor.id}"
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        when, sep, delivery_id = raw.partition("|")
        created = datetime.fromisoformat(when)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery("the page cursor is malformed") from None
    if not sep or not delivery_id or created.tzinfo is None or len(delivery_id) > 40:
        raise BadQuery("the page cursor is malformed")
    return Cursor(created.astimezone(UTC), delivery_id)


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    status: str | None = None
    endpoint_id: str | None = None
    event_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise BadQuery(f"status must be one of {', '.join(STATUSES)}")
        if self.since and self.until and self.since >= self.until:
            raise BadQuery("'since' must be before 'until'")

    def query(self) -> dict[str, str]:
        """The filter as query-string items (for the next page's link)."""
        items = {"status": self.status, "endpoint": self.endpoint_id,
                 "event_type": self.event_type,
                 "since": self.since.isoformat() if self.since else None,
                 "until": self.until.isoformat() if self.until else None}
        return {k: v for k, v in items.items() if v}


def page_size(text: str | None) -> int:
    if text is None or text == "":
        return PAGE_SIZE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise BadQuery(f"limit must be 1..{MAX_PAGE_SIZE}")
    return int(text)
