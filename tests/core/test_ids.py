"""new_id (ULID layout) and derived_id (deterministic)."""

from __future__ import annotations

import re

import pytest

from worker.core.ids import derived_id, new_id

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_BODY = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def _decode(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 32 + CROCKFORD.index(ch)
    return value


# --- new_id ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["msg", "ep", "att", "x"])
def test_new_id_is_prefix_underscore_and_26_crockford_characters(prefix: str) -> None:
    value = new_id(prefix)
    head, sep, body = value.partition("_")
    assert (head, sep) == (prefix, "_")
    assert ID_BODY.match(body)


def test_new_id_encodes_milliseconds_then_entropy() -> None:
    value = new_id("msg", now_ms=1_700_000_000_123, entropy=bytes(range(10)))
    body = value.removeprefix("msg_")
    assert _decode(body[:10]) == 1_700_000_000_123
    assert _decode(body[10:]) == int.from_bytes(bytes(range(10)), "big")


@pytest.mark.parametrize(
    ("now_ms", "entropy", "expected"),
    [
        (0, bytes(10), "msg_00000000000000000000000000"),
        (0, b"\xff" * 10, "msg_0000000000ZZZZZZZZZZZZZZZZ"),
        (2**48 - 1, bytes(10), "msg_7ZZZZZZZZZ0000000000000000"),
        (1, b"\x00" * 9 + b"\x01", "msg_00000000010000000000000001"),
    ],
)
def test_new_id_known_answers(now_ms: int, entropy: bytes, expected: str) -> None:
    assert new_id("msg", now_ms=now_ms, entropy=entropy) == expected


def test_new_id_in_the_same_millisecond_differs() -> None:
    ids = {new_id("msg", now_ms=1_700_000_000_000) for _ in range(100)}
    assert len(ids) == 100


def test_new_id_is_unique_across_many_calls() -> None:
    assert len({new_id("msg") for _ in range(2000)}) == 2000


@pytest.mark.parametrize(
    ("earlier", "later"),
    [(0, 1), (1_700_000_000_000, 1_700_000_000_001), (1_699_999_999_999, 1_700_000_000_000),
     (31, 32), (2**40, 2**41)],
)
def test_new_id_from_a_later_millisecond_sorts_after(earlier: int, later: int) -> None:
    # even with the largest entropy on the earlier id and the smallest on the later one
    first = new_id("msg", now_ms=earlier, entropy=b"\xff" * 10)
    second = new_id("msg", now_ms=later, entropy=bytes(10))
    assert first < second


def test_new_id_ids_sort_by_time_over_a_sequence_of_milliseconds() -> None:
    stamps = [1_700_000_000_000 + step * 37 for step in range(50)]
    ids = [new_id("msg", now_ms=ms) for ms in stamps]
    assert sorted(ids) == ids


def test_new_id_without_now_uses_the_current_clock() -> None:
    import time

    before = time.time_ns() // 1_000_000
    value = new_id("msg")
    after = time.time_ns() // 1_000_000
    assert before <= _decode(value.removeprefix("msg_")[:10]) <= after


def test_new_id_same_time_and_entropy_is_the_same() -> None:
    entropy = b"0123456789"
    assert new_id("a", now_ms=5, entropy=entropy) == new_id("a", now_ms=5, entropy=entropy)


# --- derived_id --------------------------------------------------------------------------


def test_derived_id_is_deterministic() -> None:
    assert derived_id("msg", "task-1:0", "ep_1") == derived_id("msg", "task-1:0", "ep_1")


def test_derived_id_has_the_same_shape_as_new_id() -> None:
    value = derived_id("msg", "a", "b")
    head, sep, body = value.partition("_")
    assert (head, sep) == ("msg", "_")
    assert ID_BODY.match(body)


def test_derived_id_is_blake2b_128_of_the_length_prefixed_parts() -> None:
    import hashlib

    digest = hashlib.blake2b(b"6:task-14:ep_1", digest_size=16).digest()
    body = derived_id("msg", "task-1", "ep_1").removeprefix("msg_")
    assert _decode(body) == int.from_bytes(digest, "big")


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("a", "b"), ("a", "c")),
        (("a", "b"), ("b", "a")),
        (("a", "bc"), ("ab", "c")),
        (("abc",), ("a", "bc")),
        (("task-1:0", "ep_1"), ("task-1:0", "ep_2")),
        (("task-1:0", "ep_1"), ("task-1:1", "ep_1")),
        (("m", "ep"), ("m", "ep", "")),
        (("m", "rejected"), ("m", "ep_rejected")),
    ],
)
def test_derived_id_differs_for_different_parts(
    one: tuple[str, ...], other: tuple[str, ...]
) -> None:
    assert derived_id("msg", *one) != derived_id("msg", *other)


def test_derived_id_prefix_changes_only_the_prefix() -> None:
    a = derived_id("msg", "x", "y")
    b = derived_id("att", "x", "y")
    assert a.removeprefix("msg_") == b.removeprefix("att_")


def test_derived_id_accepts_non_ascii_parts() -> None:
    assert derived_id("msg", "é") != derived_id("msg", "e")
