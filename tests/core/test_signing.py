"""Standard Webhooks signing, checked against the reference verifiers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
from cryptography.exceptions import InvalidSignature as BadEd25519Signature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError
from svix.webhooks import Webhook as SvixWebhook

from worker.core.errors import InvalidEndpoint, InvalidSecret, InvalidSignature
from worker.core.signing import (
    MAX_SECRET_BYTES,
    MIN_SECRET_BYTES,
    SECRET_PREFIX,
    SigningKeys,
    generate_secret,
    generate_signing_key,
    parse_signing_keys,
    public_key_of,
    secret_key,
    sign,
    sign_v1a,
    signature_header,
    signature_header_for,
    signed_content,
    signed_headers,
    signing_private_key,
    signing_public_key,
    verify,
    webhook_headers,
)

# The Standard Webhooks specification's published test vector (also used by svix).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

VERIFIERS = [
    pytest.param(StandardWebhook, id="standardwebhooks"),
    pytest.param(SvixWebhook, id="svix"),
]

BODY = b'{"type":"order.created","data":{"id":"ord_1","total":12.5,"note":"caf\xc3\xa9"}}'
MSG_ID = "msg_01HZX3K4ABCDEFGHJKMNPQRSTV"


def _secret(raw: bytes) -> str:
    return SECRET_PREFIX + base64.b64encode(raw).decode()


def _now() -> int:
    return int(time.time())


# --- known answers -----------------------------------------------------------------------


def test_sign_reproduces_the_standard_webhooks_spec_vector() -> None:
    key = secret_key(SPEC_SECRET)
    assert sign(key, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_sign_matches_a_hand_computed_hmac_sha256_over_id_timestamp_body() -> None:
    key = bytes(range(32))
    body = b'{"a":1}'
    expected_mac = hmac.new(key, b"msg_abc.1700000000.{\"a\":1}", hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(expected_mac).decode()
    assert sign(key, "msg_abc", 1700000000, body) == expected


def test_sign_signs_the_exact_body_bytes_including_non_ascii() -> None:
    key = bytes(range(24))
    body = "{\"név\":\"ünï\"}".encode()
    mac = hmac.new(key, b"id1.42." + body, hashlib.sha256).digest()
    assert sign(key, "id1", 42, body) == "v1," + base64.b64encode(mac).decode()


def test_sign_output_is_v1_and_a_32_byte_base64_digest() -> None:
    sig = sign(bytes(32), "m", 1, b"{}")
    version, _, encoded = sig.partition(",")
    assert version == "v1"
    assert len(base64.b64decode(encoded, validate=True)) == 32


# --- the reference verifiers -------------------------------------------------------------


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_reference_verifier_accepts_the_spec_vector_signature_from_sign(verifier) -> None:
    # the spec vector is old; re-sign at "now" with the spec secret so the tolerance passes
    ts = _now()
    headers = webhook_headers([secret_key(SPEC_SECRET)], SPEC_ID, ts, SPEC_BODY)
    verifier(SPEC_SECRET).verify(SPEC_BODY, headers)


@pytest.mark.parametrize("verifier", VERIFIERS)
@pytest.mark.parametrize("num_bytes", [MIN_SECRET_BYTES, 32, MAX_SECRET_BYTES])
def test_reference_verifier_accepts_our_headers_with_a_generated_secret(
    verifier, num_bytes: int
) -> None:
    secret = generate_secret(num_bytes)
    headers = webhook_headers([secret_key(secret)], MSG_ID, _now(), BODY)
    verifier(secret).verify(BODY, headers)


@pytest.mark.parametrize("verifier", VERIFIERS)
@pytest.mark.parametrize("which", [0, 1])
def test_reference_verifier_accepts_either_secret_during_rotation(verifier, which: int) -> None:
    secrets = [generate_secret(), generate_secret()]
    keys = [secret_key(s) for s in secrets]
    headers = webhook_headers(keys, MSG_ID, _now(), BODY)
    verifier(secrets[which]).verify(BODY, headers)


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_reference_verifier_rejects_a_secret_that_is_not_among_the_signing_keys(verifier) -> None:
    keys = [secret_key(generate_secret()), secret_key(generate_secret())]
    headers = webhook_headers(keys, MSG_ID, _now(), BODY)
    with pytest.raises(WebhookVerificationError):
        verifier(generate_secret()).verify(BODY, headers)


@pytest.mark.parametrize("verifier", VERIFIERS)
@pytest.mark.parametrize(
    "tampered_body",
    [
        BODY + b" ",
        BODY.replace(b"12.5", b"13.5"),
        b"",
        b"{}",
    ],
    ids=["trailing-space", "changed-value", "empty", "other-object"],
)
def test_reference_verifier_rejects_a_tampered_body(verifier, tampered_body: bytes) -> None:
    secret = generate_secret()
    headers = webhook_headers([secret_key(secret)], MSG_ID, _now(), BODY)
    with pytest.raises(WebhookVerificationError):
        verifier(secret).verify(tampered_body, headers)


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_reference_verifier_rejects_a_tampered_message_id(verifier) -> None:
    secret = generate_secret()
    headers = webhook_headers([secret_key(secret)], MSG_ID, _now(), BODY)
    headers["webhook-id"] = MSG_ID[:-1] + "W"
    with pytest.raises(WebhookVerificationError):
        verifier(secret).verify(BODY, headers)


@pytest.mark.parametrize("verifier", VERIFIERS)
@pytest.mark.parametrize("shift", [-1, 1, 60])
def test_reference_verifier_rejects_a_tampered_timestamp(verifier, shift: int) -> None:
    secret = generate_secret()
    ts = _now()
    headers = webhook_headers([secret_key(secret)], MSG_ID, ts, BODY)
    headers["webhook-timestamp"] = str(ts + shift)
    with pytest.raises(WebhookVerificationError):
        verifier(secret).verify(BODY, headers)


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_reference_verifier_rejects_our_signature_when_it_is_too_old(verifier) -> None:
    secret = generate_secret()
    headers = webhook_headers([secret_key(secret)], MSG_ID, _now() - 3600, BODY)
    with pytest.raises(WebhookVerificationError):
        verifier(secret).verify(BODY, headers)


# --- header shapes -----------------------------------------------------------------------


def test_signature_header_is_one_space_separated_entry_per_key_in_key_order() -> None:
    keys = [bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 24]
    header = signature_header(keys, "m", 5, b"{}")
    assert header.split(" ") == [sign(k, "m", 5, b"{}") for k in keys]


def test_signature_header_accepts_any_iterable_of_keys_such_as_a_generator() -> None:
    keys = [bytes([7]) * 32, bytes([8]) * 32]
    assert signature_header((k for k in keys), "m", 5, b"{}") == " ".join(
        sign(k, "m", 5, b"{}") for k in keys
    )


def test_signature_header_with_no_keys_is_empty() -> None:
    assert signature_header([], "m", 5, b"{}") == ""


def test_webhook_headers_has_exactly_the_standard_headers_and_values() -> None:
    key = bytes(range(32))
    headers = webhook_headers([key], "msg_1", 1700000000, b'{"x":1}')
    assert headers == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign(key, "msg_1", 1700000000, b'{"x":1}'),
        "content-type": "application/json",
    }


def test_webhook_headers_consumes_a_generator_of_keys_once() -> None:
    keys = [bytes([1]) * 32, bytes([2]) * 32]
    headers = webhook_headers((k for k in keys), "m", 9, b"{}")
    assert len(headers["webhook-signature"].split(" ")) == 2


# --- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_bytes", [MIN_SECRET_BYTES, 25, 32, 48, MAX_SECRET_BYTES])
def test_generate_secret_holds_the_requested_number_of_bytes(num_bytes: int) -> None:
    secret = generate_secret(num_bytes)
    assert secret.startswith("whsec_")
    assert len(secret_key(secret)) == num_bytes


def test_generate_secret_defaults_to_32_bytes() -> None:
    assert len(secret_key(generate_secret())) == 32


def test_generate_secret_is_random_each_call() -> None:
    assert len({generate_secret() for _ in range(20)}) == 20


@pytest.mark.parametrize("num_bytes", [0, 1, MIN_SECRET_BYTES - 1, MAX_SECRET_BYTES + 1, 1000])
def test_generate_secret_refuses_sizes_outside_24_to_64(num_bytes: int) -> None:
    with pytest.raises(InvalidSecret):
        generate_secret(num_bytes)


@pytest.mark.parametrize("size", [MIN_SECRET_BYTES, MIN_SECRET_BYTES + 1, 32,
                                  MAX_SECRET_BYTES - 1, MAX_SECRET_BYTES])
def test_secret_key_returns_the_decoded_bytes_at_and_inside_the_bounds(size: int) -> None:
    raw = bytes((i * 7 + 3) % 256 for i in range(size))
    assert secret_key(_secret(raw)) == raw


@pytest.mark.parametrize("size", [0, 1, 16, MIN_SECRET_BYTES - 1, MAX_SECRET_BYTES + 1, 128])
def test_secret_key_rejects_sizes_outside_the_bounds(size: int) -> None:
    with pytest.raises(InvalidSecret, match=f"not {size}"):
        secret_key(_secret(b"\xab" * size))


@pytest.mark.parametrize(
    "secret",
    [
        base64.b64encode(b"k" * 32).decode(),  # no prefix at all
        "WHSEC_" + base64.b64encode(b"k" * 32).decode(),  # prefix is case-sensitive
        "whsec" + base64.b64encode(b"k" * 32).decode(),  # no underscore
        " whsec_" + base64.b64encode(b"k" * 32).decode(),  # leading space
        "",
    ],
    ids=["no-prefix", "upper-prefix", "no-underscore", "leading-space", "empty"],
)
def test_secret_key_requires_the_whsec_prefix(secret: str) -> None:
    with pytest.raises(InvalidSecret, match="whsec_"):
        secret_key(secret)


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_" + "!" * 32,
        "whsec_" + base64.b64encode(b"k" * 32).decode() + " ",
        "whsec_" + base64.b64encode(b"k" * 32).decode().rstrip("="),  # missing padding
        "whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # '-' and '_'
        "whsec_" + base64.b64encode(b"k" * 33).decode()[:-1],  # truncated
    ],
    ids=["punctuation", "trailing-space", "missing-padding", "urlsafe-alphabet", "truncated"],
)
def test_secret_key_rejects_text_that_is_not_strict_base64(secret: str) -> None:
    with pytest.raises(InvalidSecret, match="base64"):
        secret_key(secret)


@pytest.mark.parametrize("value", [None, b"whsec_" + b"a" * 32, 123])
def test_secret_key_rejects_non_string_values(value: object) -> None:
    with pytest.raises(InvalidSecret):
        secret_key(value)  # type: ignore[arg-type]


def test_invalid_secret_is_an_invalid_endpoint_and_a_value_error() -> None:
    with pytest.raises(InvalidEndpoint):
        secret_key("nope")
    with pytest.raises(ValueError):
        secret_key("nope")


def test_secret_key_of_the_spec_secret_is_24_bytes() -> None:
    assert secret_key(SPEC_SECRET) == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert len(secret_key(SPEC_SECRET)) == 24


# === v1a: Ed25519 (whsk_ signing key, whpk_ public key) ==================================

# A known answer made outside this code base, with @stablelib/ed25519 2.1.0 (the library the
# standardwebhooks JavaScript v1a work uses): seed bytes (i * 7 + 1) & 255 for i in 0..31; its
# whsk_ is NaCl's 64-byte seed + public key; message "msg_js.1700000000.{"a":"café"}".
JS_SEED = bytes((i * 7 + 1) & 255 for i in range(32))
JS_WHSK_64 = (
    "whsk_AQgPFh0kKzI5QEdOVVxjanF4f4aNlJuiqbC3vsXM09rkAwmYz9WtFyPBaflWqgueuGGbWZK9YSwq9Cjrx5+N8A=="
)
JS_WHPK = "whpk_5AMJmM/VrRcjwWn5VqoLnrhhm1mSvWEsKvQo68efjfA="
JS_ID = "msg_js"
JS_TIMESTAMP = 1700000000
JS_BODY = '{"a":"café"}'.encode()
JS_SIGNATURE = (
    "v1a,h4ddBy3GkwtdE6bY7EJC/zBNI97ATSbJkM20Jf/DUtE0AL/AI9odnq0D+au3meOWp4TFc+b43EsJ1ra7aAs8Cg=="
)


def _whsk(raw: bytes) -> str:
    return "whsk_" + base64.b64encode(raw).decode()


def _whpk(raw: bytes) -> str:
    return "whpk_" + base64.b64encode(raw).decode()


def _raw_public(whpk: str) -> bytes:
    return base64.b64decode(whpk.removeprefix("whpk_"), validate=True)


def _v1a_headers(whsk: str, msg_id: str = MSG_ID, ts: int | None = None) -> dict[str, str]:
    keys = parse_signing_keys([whsk])
    return signed_headers(keys, msg_id, _now() if ts is None else ts, BODY)


# --- keys --------------------------------------------------------------------------------


def test_generate_signing_key_gives_a_whsk_seed_and_its_whpk_public_key() -> None:
    whsk, whpk = generate_signing_key()
    assert whsk.startswith("whsk_") and whpk.startswith("whpk_")
    seed = base64.b64decode(whsk[5:], validate=True)
    assert len(seed) == 32
    assert _raw_public(whpk) == Ed25519PrivateKey.from_private_bytes(seed).public_key(
    ).public_bytes_raw()
    assert public_key_of(whsk) == whpk


def test_generate_signing_key_is_random_each_call() -> None:
    pairs = {generate_signing_key() for _ in range(20)}
    assert len(pairs) == 20
    assert len({whpk for _, whpk in pairs}) == 20


def test_signing_private_key_reads_a_32_byte_seed() -> None:
    key = signing_private_key(_whsk(JS_SEED))
    assert key.private_bytes_raw() == JS_SEED
    assert public_key_of(_whsk(JS_SEED)) == JS_WHPK


def test_signing_private_key_reads_the_64_byte_seed_and_public_key_form() -> None:
    key = signing_private_key(JS_WHSK_64)
    assert key.private_bytes_raw() == JS_SEED
    assert public_key_of(JS_WHSK_64) == JS_WHPK


def test_signing_public_key_reads_a_whpk() -> None:
    key = signing_public_key(JS_WHPK)
    assert isinstance(key, Ed25519PublicKey)
    assert key.public_bytes_raw() == _raw_public(JS_WHPK)


@pytest.mark.parametrize(
    ("whsk", "message"),
    [
        (base64.b64encode(JS_SEED).decode(), "must start with 'whsk_'"),
        ("WHSK_" + base64.b64encode(JS_SEED).decode(), "must start with 'whsk_'"),
        (_whpk(JS_SEED), "must start with 'whsk_'"),
        ("whsec_" + base64.b64encode(JS_SEED).decode(), "must start with 'whsk_'"),
        ("", "must start with 'whsk_'"),
        ("whsk_", "not 0"),
        ("whsk_" + "!" * 44, "followed by base64"),
        ("whsk_" + base64.b64encode(JS_SEED).decode().rstrip("="), "followed by base64"),
        (_whsk(JS_SEED) + " ", "followed by base64"),
        ("whsk_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(), "followed by base64"),
        (_whsk(JS_SEED[:31]), "not 31"),
        (_whsk(JS_SEED + b"\x00"), "not 33"),
        (_whsk(JS_SEED * 2), "second half is not its public key"),
        (_whsk(base64.b64decode(JS_WHSK_64[5:])[:63]), "not 63"),
        (_whsk(base64.b64decode(JS_WHSK_64[5:]) + b"\x00"), "not 65"),
        (_whsk(JS_SEED + bytes(32)), "second half is not its public key"),
        (_whsk(JS_SEED + _raw_public(generate_signing_key()[1])), "second half is not"),
    ],
    ids=["no-prefix", "upper-prefix", "whpk-prefix", "whsec-prefix", "empty", "prefix-only",
         "punctuation", "missing-padding", "trailing-space", "urlsafe", "31-bytes", "33-bytes",
         "64-seed-twice", "63-bytes", "65-bytes", "64-zero-public-half", "64-other-public-half"],
)
def test_signing_private_key_refuses_malformed_keys(whsk: str, message: str) -> None:
    with pytest.raises(InvalidSecret, match=message):
        signing_private_key(whsk)
    with pytest.raises(InvalidSecret):
        public_key_of(whsk)
    if not whsk.startswith("whsec_"):  # a well-formed whsec_ is a fine v1 secret
        with pytest.raises(InvalidSecret):
            parse_signing_keys([whsk])


@pytest.mark.parametrize(
    ("whpk", "message"),
    [
        (base64.b64encode(bytes(32)).decode(), "must start with 'whpk_'"),
        (_whsk(JS_SEED), "must start with 'whpk_'|'whsk_' key is for signing"),
        ("whpk_", "not 0"),
        ("whpk_" + "?" * 44, "followed by base64"),
        (JS_WHPK.rstrip("="), "followed by base64"),
        (JS_WHPK + "\n", "followed by base64"),
        (_whpk(bytes(31)), "not 31"),
        (_whpk(bytes(33)), "not 33"),
        (_whpk(bytes(64)), "not 64"),
    ],
    ids=["no-prefix", "whsk", "prefix-only", "punctuation", "missing-padding",
         "trailing-newline", "31-bytes", "33-bytes", "64-bytes"],
)
def test_malformed_public_keys_are_refused_by_reading_and_by_verify(
    whpk: str, message: str
) -> None:
    if whpk.startswith("whpk_"):
        with pytest.raises(InvalidSecret, match=message):
            signing_public_key(whpk)
    whsk, _ = generate_signing_key()
    with pytest.raises(InvalidSecret, match=message.replace("'whpk_'", "'whsec_'")):
        verify(whpk, _v1a_headers(whsk), BODY)


def test_verify_refuses_a_whsk_signing_key_and_says_to_use_the_public_key() -> None:
    whsk, _ = generate_signing_key()
    with pytest.raises(InvalidSecret, match="verify with the 'whpk_' public key"):
        verify(whsk, _v1a_headers(whsk), BODY)


def test_a_malformed_key_is_refused_even_when_the_headers_are_bad_too() -> None:
    with pytest.raises(InvalidSecret):
        verify("whpk_nope", {}, BODY)


def test_invalid_secret_from_key_parsing_is_an_invalid_endpoint() -> None:
    with pytest.raises(InvalidEndpoint):
        signing_private_key("whsk_AAAA")
    with pytest.raises(ValueError):
        signing_public_key("whpk_AAAA")


# --- signatures --------------------------------------------------------------------------


def test_sign_v1a_reproduces_the_stablelib_known_answer_from_either_key_form() -> None:
    for whsk in (JS_WHSK_64, _whsk(JS_SEED)):
        key = signing_private_key(whsk)
        assert sign_v1a(key, JS_ID, JS_TIMESTAMP, JS_BODY) == JS_SIGNATURE


def test_verify_accepts_the_stablelib_known_answer() -> None:
    headers = {"webhook-id": JS_ID, "webhook-timestamp": str(JS_TIMESTAMP),
               "webhook-signature": JS_SIGNATURE}
    verify(JS_WHPK, headers, JS_BODY, now=JS_TIMESTAMP)


def test_sign_v1a_is_checked_by_cryptography_over_the_exact_id_timestamp_body_bytes() -> None:
    whsk, whpk = generate_signing_key()
    ts = 1700000123
    sig = sign_v1a(signing_private_key(whsk), MSG_ID, ts, BODY)
    version, _, encoded = sig.partition(",")
    assert version == "v1a"
    raw = base64.b64decode(encoded, validate=True)
    assert len(raw) == 64
    public = Ed25519PublicKey.from_public_bytes(_raw_public(whpk))
    exact = MSG_ID.encode() + b"." + str(ts).encode() + b"." + BODY
    assert signed_content(MSG_ID, ts, BODY) == exact
    public.verify(raw, exact)  # raises if it does not match
    for other in (exact + b" ", exact[:-1], b"x" + exact, exact.replace(b"12.5", b"13.5")):
        with pytest.raises(BadEd25519Signature):
            public.verify(raw, other)


def test_sign_v1a_is_deterministic_for_the_same_key_and_message() -> None:
    key = signing_private_key(generate_signing_key()[0])
    assert sign_v1a(key, "m", 1, b"{}") == sign_v1a(key, "m", 1, b"{}")
    assert sign_v1a(key, "m", 1, b"{}") != sign_v1a(key, "m", 2, b"{}")


def test_verify_accepts_a_v1a_signature_with_its_public_key() -> None:
    whsk, whpk = generate_signing_key()
    verify(whpk, _v1a_headers(whsk), BODY)


def test_verify_refuses_a_v1a_signature_checked_with_another_public_key() -> None:
    whsk, _ = generate_signing_key()
    _, other_whpk = generate_signing_key()
    with pytest.raises(InvalidSignature, match="no v1a signature matches"):
        verify(other_whpk, _v1a_headers(whsk), BODY)


@pytest.mark.parametrize(
    "tampered_body",
    [BODY + b" ", BODY.replace(b"12.5", b"13.5"), b"", b"{}"],
    ids=["trailing-space", "changed-value", "empty", "other-object"],
)
def test_verify_v1a_refuses_a_tampered_body(tampered_body: bytes) -> None:
    whsk, whpk = generate_signing_key()
    headers = _v1a_headers(whsk)
    with pytest.raises(InvalidSignature):
        verify(whpk, headers, tampered_body)


@pytest.mark.parametrize("shift", [-1, 1, 60])
def test_verify_v1a_refuses_a_tampered_timestamp(shift: int) -> None:
    whsk, whpk = generate_signing_key()
    ts = _now()
    headers = _v1a_headers(whsk, ts=ts)
    headers["webhook-timestamp"] = str(ts + shift)
    with pytest.raises(InvalidSignature, match="no v1a signature matches"):
        verify(whpk, headers, BODY)


def test_verify_v1a_refuses_a_tampered_message_id() -> None:
    whsk, whpk = generate_signing_key()
    headers = _v1a_headers(whsk)
    headers["webhook-id"] = MSG_ID[:-1] + "W"
    with pytest.raises(InvalidSignature, match="no v1a signature matches"):
        verify(whpk, headers, BODY)


def test_verify_v1a_refuses_a_signature_that_is_too_old_or_from_the_future() -> None:
    whsk, whpk = generate_signing_key()
    for ts in (_now() - 3600, _now() + 3600):
        with pytest.raises(InvalidSignature, match="outside"):
            verify(whpk, _v1a_headers(whsk, ts=ts), BODY)


def test_verify_v1a_refuses_a_signature_with_a_flipped_bit() -> None:
    whsk, whpk = generate_signing_key()
    headers = _v1a_headers(whsk)
    raw = bytearray(base64.b64decode(headers["webhook-signature"][4:]))
    for index in (0, 31, 32, 63):
        flipped = bytearray(raw)
        flipped[index] ^= 0x01
        headers["webhook-signature"] = "v1a," + base64.b64encode(bytes(flipped)).decode()
        with pytest.raises(InvalidSignature):
            verify(whpk, headers, BODY)


def test_verify_v1a_skips_malformed_entries_and_finds_the_good_one() -> None:
    whsk, whpk = generate_signing_key()
    headers = _v1a_headers(whsk)
    good = headers["webhook-signature"]
    junk = ["v1a,", "v1a,!!!", "v1a," + base64.b64encode(bytes(63)).decode(),
            "v1a," + base64.b64encode(bytes(64)).decode(), "v1a", "v2," + good[4:], good[4:]]
    headers["webhook-signature"] = " ".join([*junk, good])
    verify(whpk, headers, BODY)
    headers["webhook-signature"] = " ".join(junk)
    with pytest.raises(InvalidSignature):
        verify(whpk, headers, BODY)


def test_a_v1a_signature_is_not_taken_for_v1_nor_v1_for_v1a() -> None:
    whsk, whpk = generate_signing_key()
    secret = generate_secret()
    v1a_only = _v1a_headers(whsk)
    v1_only = webhook_headers([secret_key(secret)], MSG_ID, _now(), BODY)
    with pytest.raises(InvalidSignature):
        verify(secret, v1a_only, BODY)
    with pytest.raises(InvalidSignature):
        verify(whpk, v1_only, BODY)
    # relabelling the HMAC as v1a does not help either
    v1_only["webhook-signature"] = "v1a," + v1_only["webhook-signature"][3:]
    with pytest.raises(InvalidSignature):
        verify(whpk, v1_only, BODY)


# --- both schemes at once ----------------------------------------------------------------


def test_one_header_can_carry_both_schemes_and_each_verifies() -> None:
    secret = generate_secret()
    whsk, whpk = generate_signing_key()
    keys = parse_signing_keys([whsk, secret])  # order given does not matter: v1 goes first
    ts = _now()
    headers = signed_headers(keys, MSG_ID, ts, BODY)
    entries = headers["webhook-signature"].split(" ")
    assert entries == [
        sign(secret_key(secret), MSG_ID, ts, BODY),
        sign_v1a(signing_private_key(whsk), MSG_ID, ts, BODY),
    ]
    verify(secret, headers, BODY)
    verify(whpk, headers, BODY)
    with pytest.raises(InvalidSignature):
        verify(secret, headers, BODY + b" ")
    with pytest.raises(InvalidSignature):
        verify(whpk, headers, BODY + b" ")


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_reference_verifiers_still_accept_the_v1_entry_of_a_mixed_header(verifier) -> None:
    # Receivers on libraries without v1a keep working while an endpoint migrates.
    secret = generate_secret()
    whsk, _ = generate_signing_key()
    headers = signed_headers(parse_signing_keys([secret, whsk]), MSG_ID, _now(), BODY)
    verifier(secret).verify(BODY, headers)


def test_signature_header_for_lists_every_v1_then_every_v1a_in_key_order() -> None:
    secrets = [generate_secret(), generate_secret()]
    whsks = [generate_signing_key()[0], generate_signing_key()[0]]
    keys = parse_signing_keys([whsks[0], secrets[0], whsks[1], secrets[1]])
    header = signature_header_for(keys, "m", 5, b"{}")
    assert header.split(" ") == [
        sign(secret_key(secrets[0]), "m", 5, b"{}"),
        sign(secret_key(secrets[1]), "m", 5, b"{}"),
        sign_v1a(signing_private_key(whsks[0]), "m", 5, b"{}"),
        sign_v1a(signing_private_key(whsks[1]), "m", 5, b"{}"),
    ]


def test_signature_header_for_with_only_hmac_keys_matches_signature_header() -> None:
    secrets = [generate_secret(), generate_secret()]
    keys = parse_signing_keys(secrets)
    raw = [secret_key(s) for s in secrets]
    assert signature_header_for(keys, "m", 5, b"{}") == signature_header(raw, "m", 5, b"{}")
    assert signed_headers(keys, "m", 5, b"{}") == webhook_headers(raw, "m", 5, b"{}")


def test_signed_headers_has_exactly_the_standard_headers() -> None:
    whsk, _ = generate_signing_key()
    keys = parse_signing_keys([whsk])
    headers = signed_headers(keys, "msg_1", 1700000000, b'{"x":1}')
    assert headers == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign_v1a(keys.ed25519[0], "msg_1", 1700000000, b'{"x":1}'),
        "content-type": "application/json",
    }


def test_signature_header_for_no_keys_is_empty() -> None:
    assert signature_header_for(SigningKeys(), "m", 5, b"{}") == ""
    assert parse_signing_keys([]) == SigningKeys()


# --- parsing secrets into keys -----------------------------------------------------------


def test_parse_signing_keys_sorts_each_secret_by_its_prefix_keeping_order() -> None:
    secrets = [generate_secret(), generate_secret(32), generate_secret(64)]
    whsks = [generate_signing_key()[0] for _ in range(2)]
    keys = parse_signing_keys(iter([secrets[0], whsks[0], secrets[1], whsks[1], secrets[2]]))
    assert keys.hmac == tuple(secret_key(s) for s in secrets)
    assert [k.private_bytes_raw() for k in keys.ed25519] == [
        signing_private_key(w).private_bytes_raw() for w in whsks
    ]


def test_parse_signing_keys_refuses_a_public_key_with_a_pointed_message() -> None:
    _, whpk = generate_signing_key()
    with pytest.raises(InvalidSecret, match="'whpk_' public key cannot sign"):
        parse_signing_keys([generate_secret(), whpk])


@pytest.mark.parametrize(
    "secret",
    ["", "nope", base64.b64encode(bytes(32)).decode(), "WHSEC_" + "A" * 44, "whsk" + "A" * 44,
     None, b"whsec_" + b"A" * 44],
    ids=["empty", "word", "bare-base64", "upper-whsec", "no-underscore", "none", "bytes"],
)
def test_parse_signing_keys_refuses_any_other_prefix(secret: object) -> None:
    with pytest.raises(InvalidSecret, match="must start with 'whsec_' \\(v1\\) or 'whsk_'"):
        parse_signing_keys([secret])  # type: ignore[list-item]


def test_parse_signing_keys_refuses_a_malformed_whsec_as_secret_key_does() -> None:
    with pytest.raises(InvalidSecret, match="not 16"):
        parse_signing_keys([_secret(bytes(16))])


def test_signing_keys_repr_shows_counts_but_no_key_material() -> None:
    secret = generate_secret()
    whsk, _ = generate_signing_key()
    keys = parse_signing_keys([secret, whsk])
    text = repr(keys)
    assert text == "SigningKeys(hmac=1 keys, ed25519=1 keys)"
    assert secret_key(secret).hex() not in text
    assert secret[6:] not in text and whsk[5:] not in text
