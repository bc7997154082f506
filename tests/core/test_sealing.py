"""Sealing endpoint credentials: AES-256-GCM under a rotating key ring, bound to the row."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.core.errors import KeyRingError, SealError, WebhookError
from worker.core.sealing import (
    KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    KeyRing,
    generate_key,
    open_sealed,
    seal,
    sealed_key_id,
)

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))
ITEM1 = "k1:" + base64.b64encode(KEY1).decode()
ITEM2 = "k2:" + base64.b64encode(KEY2).decode()
SECRET = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ROW = b"ep_01HZX3K4ABCDEFGHJKMNPQRSTV"
TOKEN_SHAPE = re.compile(r"sealed1\.[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]+")


def _ring(*items: str) -> KeyRing:
    return KeyRing.parse(",".join(items))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- round trip and token shape ----------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", SECRET, bytes(range(256)) * 40])
def test_seal_then_open_gives_back_the_plaintext(plaintext: bytes) -> None:
    ring = _ring(ITEM1)
    assert open_sealed(ring, seal(ring, plaintext, ROW), ROW) == plaintext


def test_token_is_ascii_version_kid_and_unpadded_urlsafe_base64() -> None:
    token = seal(_ring(ITEM1), SECRET, ROW)
    assert token.isascii()
    assert TOKEN_SHAPE.fullmatch(token)
    assert token.startswith("sealed1.k1.")
    assert sealed_key_id(token) == "k1"


def test_token_data_is_nonce_then_ciphertext_and_tag_that_aesgcm_opens_directly() -> None:
    token = seal(_ring(ITEM1), SECRET, ROW)
    data = _unb64url(token.split(".")[2])
    assert len(data) == NONCE_BYTES + len(SECRET) + TAG_BYTES
    # The header is authenticated along with the caller's associated data.
    opened = AESGCM(KEY1).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], b"sealed1.k1." + ROW)
    assert opened == SECRET


def test_sealing_twice_uses_fresh_nonces() -> None:
    ring = _ring(ITEM1)
    tokens = {seal(ring, SECRET, ROW) for _ in range(50)}
    assert len(tokens) == 50
    nonces = {_unb64url(t.split(".")[2])[:NONCE_BYTES] for t in tokens}
    assert len(nonces) == 50


def test_token_shows_neither_the_plaintext_nor_its_base64_or_hex() -> None:
    plaintext = b"whsec_" + bytes(range(24)) + b"supersecretvalue"
    token = seal(_ring(ITEM1), plaintext, ROW)
    spellings = [
        plaintext,
        b"supersecretvalue",
        base64.b64encode(plaintext),
        base64.urlsafe_b64encode(plaintext),
        base64.urlsafe_b64encode(plaintext).rstrip(b"="),
        plaintext.hex().encode(),
        plaintext.hex().upper().encode(),
    ]
    for spelling in spellings:
        assert spelling.decode("latin-1") not in token
    assert KEY1.hex() not in token
    assert base64.b64encode(KEY1).decode() not in token


# --- binding to the row ------------------------------------------------------------------


@pytest.mark.parametrize("other", [b"", b"ep_other", ROW + b"x", ROW[:-1], ROW.upper()])
def test_a_token_does_not_open_with_other_associated_data(other: bytes) -> None:
    ring = _ring(ITEM1)
    token = seal(ring, SECRET, ROW)
    with pytest.raises(SealError, match="does not open with key 'k1': wrong key, or the row"):
        open_sealed(ring, token, other)


def test_a_token_relabelled_to_another_id_holding_the_same_key_does_not_open() -> None:
    ring = _ring(ITEM1, "k1b:" + base64.b64encode(KEY1).decode())
    token = seal(ring, SECRET, ROW)
    relabelled = token.replace("sealed1.k1.", "sealed1.k1b.")
    with pytest.raises(SealError, match="does not open with key 'k1b'"):
        open_sealed(ring, relabelled, ROW)


# --- tampering ---------------------------------------------------------------------------


def _tamper_byte(token: str, index: int) -> str:
    head, _, encoded = token.rpartition(".")
    data = bytearray(_unb64url(encoded))
    data[index] ^= 0x01
    return f"{head}.{_b64url(bytes(data))}"


@pytest.mark.parametrize(
    "index",
    [0, NONCE_BYTES - 1, NONCE_BYTES, NONCE_BYTES + 5, -TAG_BYTES - 1, -TAG_BYTES, -1],
    ids=["nonce-first", "nonce-last", "ciphertext-first", "ciphertext-mid", "ciphertext-last",
         "tag-first", "tag-last"],
)
def test_a_flipped_bit_in_nonce_ciphertext_or_tag_does_not_open(index: int) -> None:
    ring = _ring(ITEM1)
    tampered = _tamper_byte(seal(ring, SECRET, ROW), index)
    with pytest.raises(SealError, match="does not open with key 'k1'"):
        open_sealed(ring, tampered, ROW)


def test_a_truncated_or_extended_ciphertext_does_not_open() -> None:
    ring = _ring(ITEM1)
    head, _, encoded = seal(ring, SECRET, ROW).rpartition(".")
    data = _unb64url(encoded)
    for changed in (data[:-1], data + b"\x00", data[:NONCE_BYTES + TAG_BYTES]):
        with pytest.raises(SealError, match="does not open"):
            open_sealed(ring, f"{head}.{_b64url(changed)}", ROW)


def test_a_changed_version_is_refused_as_not_a_token() -> None:
    ring = _ring(ITEM1)
    token = seal(ring, SECRET, ROW)
    with pytest.raises(SealError, match=r"not a sealed token: expected 'sealed1\.<key id>"):
        open_sealed(ring, "sealed2" + token[len("sealed1"):], ROW)


def test_a_changed_key_id_is_refused() -> None:
    ring = _ring(ITEM1, ITEM2)
    token = seal(ring, SECRET, ROW)
    with pytest.raises(SealError, match="does not open with key 'k2'"):
        open_sealed(ring, token.replace(".k1.", ".k2."), ROW)


def test_a_non_canonical_spelling_of_the_data_is_refused() -> None:
    ring = _ring(ITEM1)
    # 12 + 7 + 16 = 35 bytes: the last base64 character carries 2 unused bits.
    token = seal(ring, b"1234567", ROW)
    head, _, encoded = token.rpartition(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(encoded[-1])
    other = alphabet[last ^ 0b01]  # same decoded bytes, different spelling
    assert _unb64url(encoded[:-1] + other) == _unb64url(encoded)
    with pytest.raises(SealError, match="not canonical base64"):
        open_sealed(ring, f"{head}.{encoded[:-1]}{other}", ROW)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "not a sealed token"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "not a sealed token"),
        ("sealed1.k1", "not a sealed token"),
        ("sealed1.k1.AAAA.AAAA", "not a sealed token"),
        ("SEALED1.k1." + "A" * 40, "not a sealed token"),
        ("sealed1..", "its key id is not"),
        ("sealed1.k 1." + "A" * 40, "its key id is not"),
        ("sealed1." + "k" * 33 + "." + "A" * 40, "its key id is not"),
        ("sealed1.k1.", "not unpadded urlsafe base64"),
        ("sealed1.k1." + "A" * 40 + "==", "not unpadded urlsafe base64"),
        ("sealed1.k1." + "A+/A" * 10, "not unpadded urlsafe base64"),
        ("sealed1.k1." + "A" * 41, "not unpadded urlsafe base64"),
        ("sealed1.k1." + "A" * 36, "too short to hold a nonce and tag"),
    ],
)
def test_malformed_tokens_are_refused_with_a_one_line_message(token: str, message: str) -> None:
    ring = _ring(ITEM1)
    with pytest.raises(SealError, match=message) as info:
        open_sealed(ring, token, ROW)
    assert "\n" not in str(info.value)
    with pytest.raises(SealError, match=message):
        sealed_key_id(token)


def test_malformed_token_messages_quote_no_part_of_the_token() -> None:
    with pytest.raises(SealError) as info:
        open_sealed(_ring(ITEM1), "hunter2.is.mypassword", ROW)
    assert "hunter2" not in str(info.value)
    assert "mypassword" not in str(info.value)


@pytest.mark.parametrize("value", [None, b"sealed1.k1.AAAA", 7])
def test_a_token_that_is_not_text_is_refused(value: object) -> None:
    with pytest.raises(SealError, match="must be text"):
        open_sealed(_ring(ITEM1), value, ROW)  # type: ignore[arg-type]


# --- keys that are missing or wrong ------------------------------------------------------


def test_a_token_sealed_with_a_key_not_in_the_ring_names_it_and_the_ring() -> None:
    token = seal(_ring(ITEM1), SECRET, ROW)
    with pytest.raises(SealError) as info:
        open_sealed(_ring(ITEM2), token, ROW)
    assert str(info.value) == (
        "sealed with key 'k1', which is not in WEBHOOKS_SECRET_KEYS (it holds: k2)"
    )


def test_the_unknown_key_message_names_the_rings_source_and_all_its_ids() -> None:
    token = seal(_ring(ITEM1), SECRET, ROW)
    ring = KeyRing.parse(f"{ITEM2},k3:{base64.b64encode(bytes(32)).decode()}", "/etc/wh.key")
    with pytest.raises(SealError, match=r"not in /etc/wh\.key \(it holds: k2, k3\)$"):
        open_sealed(ring, token, ROW)


def test_a_different_key_under_the_same_id_does_not_open() -> None:
    token = seal(_ring(ITEM1), SECRET, ROW)
    impostor = _ring("k1:" + base64.b64encode(KEY2).decode())
    with pytest.raises(SealError) as info:
        open_sealed(impostor, token, ROW)
    assert str(info.value) == "does not open with key 'k1': wrong key, or the row was altered"
    assert info.value.__cause__ is None  # no cryptography traceback to dig through


# --- rotation ----------------------------------------------------------------------------


def test_a_ring_with_a_new_key_first_opens_old_tokens_and_seals_with_the_new_key() -> None:
    old_ring = _ring(ITEM1)
    old_token = seal(old_ring, SECRET, ROW)
    rotated = _ring(ITEM2, ITEM1)
    assert open_sealed(rotated, old_token, ROW) == SECRET
    new_token = seal(rotated, SECRET, ROW)
    assert sealed_key_id(new_token) == "k2"
    assert open_sealed(rotated, new_token, ROW) == SECRET
    # once the old key is dropped, only the resealed token opens
    retired = _ring(ITEM2)
    assert open_sealed(retired, new_token, ROW) == SECRET
    with pytest.raises(SealError, match="sealed with key 'k1', which is not in"):
        open_sealed(retired, old_token, ROW)
    # and the old ring does not know the new key
    with pytest.raises(SealError, match=r"\(it holds: k1\)"):
        open_sealed(old_ring, new_token, ROW)


def test_with_key_puts_the_new_key_first() -> None:
    ring = _ring(ITEM1).with_key(ITEM2)
    assert ring.key_ids == ("k2", "k1")
    assert ring.sealing_key_id == "k2"
    assert ring.source == "WEBHOOKS_SECRET_KEYS"
    assert ring == _ring(ITEM2, ITEM1)


def test_with_key_refuses_an_id_already_in_the_ring() -> None:
    with pytest.raises(KeyRingError, match="lists key id 'k1' twice"):
        _ring(ITEM1).with_key("k1:" + base64.b64encode(KEY2).decode())


def test_with_key_refuses_a_malformed_item() -> None:
    with pytest.raises(KeyRingError, match="has no ':'"):
        _ring(ITEM1).with_key("garbage")


# --- parsing -----------------------------------------------------------------------------


def test_parse_keeps_order_ids_and_key_bytes() -> None:
    ring = KeyRing.parse(f"{ITEM2},{ITEM1}")
    assert ring.key_ids == ("k2", "k1")
    assert ring.sealing_key_id == "k2"
    assert ring.keys == (("k2", KEY2), ("k1", KEY1))


@pytest.mark.parametrize(
    "text",
    [
        f"  {ITEM1} , {ITEM2}  ",
        f"{ITEM1},\n{ITEM2}\n",
        f"\n\t{ITEM1},\r\n  {ITEM2},",
        f"{ITEM1} ,\n\n {ITEM2} ,\n",
        f"k1 : {ITEM1[3:]},k2:{ITEM2[3:]}",
    ],
    ids=["spaces", "newlines", "tabs-crlf-trailing-comma", "blank-lines", "spaces-round-colon"],
)
def test_parse_tolerates_whitespace_around_items(text: str) -> None:
    assert KeyRing.parse(text).keys == (("k1", KEY1), ("k2", KEY2))


# Bytes whose base64 spells '+' and '/' (standard) or '-' and '_' (urlsafe).
ODD_KEY = bytes([0xFB, 0xFF, 0xBF] * 10 + [0xFE, 0xFF])


@pytest.mark.parametrize(
    "encoded",
    [
        base64.b64encode(ODD_KEY).decode(),
        base64.b64encode(ODD_KEY).decode().rstrip("="),
        base64.urlsafe_b64encode(ODD_KEY).decode(),
        base64.urlsafe_b64encode(ODD_KEY).decode().rstrip("="),
    ],
    ids=["standard", "standard-unpadded", "urlsafe", "urlsafe-unpadded"],
)
def test_parse_accepts_standard_and_urlsafe_base64(encoded: str) -> None:
    assert set(encoded) & set("+/-_")
    assert KeyRing.parse(f"kx:{encoded}").keys == (("kx", ODD_KEY),)


@pytest.mark.parametrize("kid", ["a", "K_1-x", "0", "k" * 32, "abcDEF0123456789_-"])
def test_parse_accepts_key_ids_of_1_to_32_safe_characters(kid: str) -> None:
    assert KeyRing.parse(f"{kid}:{ITEM1[3:]}").key_ids == (kid,)


B64_KEY = base64.b64encode(KEY1).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "WEBHOOKS_SECRET_KEYS is empty: set it to 'kid:BASE64' items; make one with "
             "`webhooks keys generate`"),
        ("  \n ", "WEBHOOKS_SECRET_KEYS is empty"),
        (",", "WEBHOOKS_SECRET_KEYS item 1 is empty: remove the extra comma"),
        (f"{ITEM1},,{ITEM2}", "WEBHOOKS_SECRET_KEYS item 2 is empty: remove the extra comma"),
        (B64_KEY, "WEBHOOKS_SECRET_KEYS item 1 has no ':': each item is 'kid:BASE64'; make one "
                  "with `webhooks keys generate`"),
        (f"{ITEM1},{B64_KEY}", "WEBHOOKS_SECRET_KEYS item 2 has no ':'"),
        (f":{B64_KEY}", "WEBHOOKS_SECRET_KEYS item 1 has an invalid key id: use 1-32 of "
                        "A-Z a-z 0-9 _ - before the ':'"),
        (f"k.1:{B64_KEY}", "item 1 has an invalid key id"),
        (f"k/1:{B64_KEY}", "item 1 has an invalid key id"),
        (f"{'k' * 33}:{B64_KEY}", "item 1 has an invalid key id"),
        (f"{ITEM1},{ITEM1}", "WEBHOOKS_SECRET_KEYS lists key id 'k1' twice: give each key its "
                             "own id"),
        (f"k1:{B64_KEY},k1:{base64.b64encode(KEY2).decode()}", "lists key id 'k1' twice"),
        ("k1:", "WEBHOOKS_SECRET_KEYS key 'k1' is not base64: make one with "
                "`webhooks keys generate`"),
        ("k1:not*base64!", "WEBHOOKS_SECRET_KEYS key 'k1' is not base64"),
        ("k1:" + B64_KEY + "===", "key 'k1' is not base64"),
        ("k1:" + B64_KEY[:-3], "key 'k1' is not base64"),  # 41 characters: no whole bytes
        ("k1:" + B64_KEY[:22] + " " + B64_KEY[22:], "WEBHOOKS_SECRET_KEYS key 'k1' has spaces "
                                                    "or line breaks in it: separate items with "
                                                    "commas"),
        (f"{ITEM1}\n{ITEM2}", "key 'k1' has spaces or line breaks in it: separate items with "
                              "commas"),
        ("k1:" + base64.b64encode(bytes(16)).decode(), "WEBHOOKS_SECRET_KEYS key 'k1' is 16 "
                                                       "bytes, not 32: make one with `webhooks "
                                                       "keys generate`"),
        ("k1:" + base64.b64encode(bytes(31)).decode(), "key 'k1' is 31 bytes, not 32"),
        ("k1:" + base64.b64encode(bytes(33)).decode(), "key 'k1' is 33 bytes, not 32"),
        ("k1:" + base64.b64encode(bytes(64)).decode(), "key 'k1' is 64 bytes, not 32"),
    ],
)
def test_parse_errors_say_where_what_and_how_to_fix(text: str, message: str) -> None:
    with pytest.raises(KeyRingError) as info:
        KeyRing.parse(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_errors_name_the_given_source() -> None:
    with pytest.raises(KeyRingError, match=r"^/run/secrets/wh\.key key 'k1' is 16 bytes"):
        KeyRing.parse("k1:" + base64.b64encode(bytes(16)).decode(), "/run/secrets/wh.key")


@pytest.mark.parametrize(
    "text",
    [
        B64_KEY,
        f"{B64_KEY}:k1",
        f"k1:{B64_KEY[:-4]}",
        f"k1:{B64_KEY[:20]} {B64_KEY[20:]}",
        f"k1:{B64_KEY}!",
        f"{ITEM1},{ITEM1}",
        f"{B64_KEY}:{B64_KEY}",
    ],
)
def test_parse_errors_never_show_key_material(text: str) -> None:
    with pytest.raises(KeyRingError) as info:
        KeyRing.parse(text)
    message = str(info.value)
    for chunk in (B64_KEY[i:i + 8] for i in range(0, len(B64_KEY) - 8, 4)):
        assert chunk not in message


def test_parse_refuses_text_that_is_not_a_string() -> None:
    with pytest.raises(KeyRingError, match="must be text"):
        KeyRing.parse(b"k1:AAAA")  # type: ignore[arg-type]


def test_key_ring_error_is_a_webhook_error_and_a_value_error() -> None:
    assert issubclass(KeyRingError, WebhookError)
    assert issubclass(KeyRingError, ValueError)
    assert issubclass(SealError, WebhookError)


def test_building_a_ring_directly_is_checked_too() -> None:
    assert KeyRing((("k1", KEY1),)).sealing_key_id == "k1"
    with pytest.raises(KeyRingError, match="holds no key"):
        KeyRing(())
    with pytest.raises(KeyRingError, match="is 31 bytes, not 32"):
        KeyRing((("k1", KEY1[:31]),))
    with pytest.raises(KeyRingError, match="invalid key id"):
        KeyRing((("k 1", KEY1),))
    with pytest.raises(KeyRingError, match="twice"):
        KeyRing((("k1", KEY1), ("k1", KEY2)))


# --- repr and generated keys -------------------------------------------------------------


def test_repr_and_str_show_key_ids_but_no_key_material() -> None:
    ring = _ring(ITEM1, ITEM2)
    for text in (repr(ring), str(ring), f"{ring}", repr([ring]), repr({"ring": ring})):
        assert "k1" in text and "k2" in text
        for key in (KEY1, KEY2):
            assert repr(key) not in text
            assert key.hex() not in text
            assert base64.b64encode(key).decode() not in text
            assert base64.b64encode(key).decode()[:12] not in text
    assert repr(ring) == "KeyRing(key_ids=('k1', 'k2'), source='WEBHOOKS_SECRET_KEYS')"


def test_generate_key_makes_an_item_that_parses_to_a_random_32_byte_key() -> None:
    item = generate_key()
    kid, _, encoded = item.partition(":")
    assert re.fullmatch(r"k[0-9a-f]{8}", kid)
    ring = KeyRing.parse(item)
    assert ring.key_ids == (kid,)
    assert len(ring.keys[0][1]) == KEY_BYTES
    assert base64.b64decode(encoded, validate=True) == ring.keys[0][1]
    assert len({generate_key() for _ in range(20)}) == 20
    assert len({generate_key().partition(":")[0] for _ in range(20)}) == 20


def test_generate_key_uses_the_given_id() -> None:
    item = generate_key("2025-rotation_b")
    assert KeyRing.parse(item).key_ids == ("2025-rotation_b",)


@pytest.mark.parametrize("kid", ["", "a b", "a.b", "a:b", "k" * 33])
def test_generate_key_refuses_an_invalid_id(kid: str) -> None:
    with pytest.raises(KeyRingError, match="invalid key id"):
        generate_key(kid)


def test_generated_keys_seal_and_open_across_a_rotation() -> None:
    first = KeyRing.parse(generate_key())
    token = seal(first, SECRET, ROW)
    second = first.with_key(generate_key())
    assert open_sealed(second, token, ROW) == SECRET
    assert sealed_key_id(seal(second, SECRET, ROW)) == second.sealing_key_id != sealed_key_id(token)
