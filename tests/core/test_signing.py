"""Standard Webhooks signing, checked against the reference verifiers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError
from svix.webhooks import Webhook as SvixWebhook

from worker.core.errors import InvalidEndpoint, InvalidSecret
from worker.core.signing import (
    MAX_SECRET_BYTES,
    MIN_SECRET_BYTES,
    SECRET_PREFIX,
    generate_secret,
    secret_key,
    sign,
    signature_header,
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
