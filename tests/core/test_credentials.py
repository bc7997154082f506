"""Endpoint credentials (worker.core.credentials): sealed as one token bound to the endpoint id,
rotated with a bounded overlap. Pure: no database."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from worker.core.credentials import (
    MAX_RETIRING_SECRETS,
    Credentials,
    fresh,
    open_credentials,
    rotated,
    seal_credentials,
)
from worker.core.errors import SealError
from worker.core.models import Endpoint
from worker.core.sealing import KeyRing, seal, sealed_key_id
from worker.core.signing import generate_secret, generate_signing_key, secret_key

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))
RING1 = KeyRing.parse("k1:" + base64.b64encode(KEY1).decode())
RING2 = KeyRing.parse("k2:" + base64.b64encode(KEY2).decode())
RING21 = RING2.with_key("k3:" + base64.b64encode(bytes(32)).decode())  # k3 seals, k2 opens
BOTH = KeyRing.parse(f"k2:{base64.b64encode(KEY2).decode()},k1:{base64.b64encode(KEY1).decode()}")
T0 = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
EP = "ep_01HZX3K4ABCDEFGHJKMNPQRSTV"


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _creds(*pairs: tuple[str, datetime | None],
           headers: tuple[tuple[str, str], ...] = ()) -> Credentials:
    return Credentials(tuple(s for s, _ in pairs), tuple(u for _, u in pairs), headers)


# -- fresh ------------------------------------------------------------------------------------


def test_fresh_secrets_sign_without_end() -> None:
    creds = fresh(["whsec_a", "whsec_b"], [("X-Api-Key", "k")])
    assert creds == Credentials(("whsec_a", "whsec_b"), (None, None), (("X-Api-Key", "k"),))


def test_fresh_defaults_to_no_headers_and_takes_any_sequence() -> None:
    assert fresh(("whsec_a",)) == Credentials(("whsec_a",), (None,), ())
    assert fresh([]) == Credentials((), (), ())
    headers = [["A", "1"], ["B", "2"]]
    creds = fresh(["s"], [tuple(h) for h in headers])  # type: ignore[misc]
    assert creds.headers == (("A", "1"), ("B", "2"))
    assert isinstance(creds.secrets, tuple) and isinstance(creds.headers, tuple)


def test_credentials_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        fresh(["s"]).secrets = ()  # type: ignore[misc]


# -- sealing round trip -----------------------------------------------------------------------


@pytest.mark.parametrize("creds", [
    fresh([generate_secret()]),
    fresh([generate_secret(), generate_signing_key()[0]], [("Authorization", "Bearer t0k3n")]),
    _creds(("whsec_new", None), ("whsec_old", _at(60)), ("whsec_older", _at(5)),
           headers=(("X-A", "1"), ("X-B", ""), ("X-A", "2"))),
    fresh(["whsec_x"], [("X-Unicode", "päß wört ✓"), ("X-Quote", '"\\,\n')]),
    Credentials((), (), ()),
])
def test_seal_then_open_gives_back_the_credentials(creds: Credentials) -> None:
    token = seal_credentials(RING1, EP, creds)
    assert open_credentials(RING1, EP, token) == creds


def test_ends_come_back_aware_and_to_the_microsecond() -> None:
    end = datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
    opened = open_credentials(RING1, EP, seal_credentials(RING1, EP, _creds(("s", None),
                                                                            ("t", end))))
    assert opened.secrets_until == (None, end)
    assert opened.secrets_until[1] is not None and opened.secrets_until[1].tzinfo is not None


def test_an_end_in_another_zone_comes_back_as_the_same_instant() -> None:
    plus5 = timezone(timedelta(hours=5, minutes=30))
    end = _at(90).astimezone(plus5)
    opened = open_credentials(RING1, EP, seal_credentials(RING1, EP, _creds(("s", end))))
    assert opened.secrets_until == (_at(90),)


def test_token_is_sealed_under_the_rings_first_key() -> None:
    assert sealed_key_id(seal_credentials(RING1, EP, fresh(["s"]))) == "k1"
    assert sealed_key_id(seal_credentials(BOTH, EP, fresh(["s"]))) == "k2"
    assert seal_credentials(RING1, EP, fresh(["s"])).startswith("sealed1.k1.")


def test_sealing_twice_gives_two_tokens() -> None:
    creds = fresh([generate_secret()])
    assert seal_credentials(RING1, EP, creds) != seal_credentials(RING1, EP, creds)


def test_the_token_shows_no_secret_and_no_header_in_any_encoding() -> None:
    whsec = generate_secret()
    whsk, _ = generate_signing_key()
    header_value = "Bearer sk_live_4f9a8b7c6d5e4f3a2b1c"
    token = seal_credentials(RING1, EP, fresh([whsec, whsk], [("Authorization", header_value)]))
    raw_hmac = secret_key(whsec)
    raw_ed = base64.b64decode(whsk.removeprefix("whsk_"))
    needles = [whsec, whsec.removeprefix("whsec_"), whsk, whsk.removeprefix("whsk_"),
               header_value, "sk_live_4f9a8b7c6d5e4f3a2b1c", "Authorization"]
    for raw in (raw_hmac, raw_ed, header_value.encode()):
        needles += [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(),
                    base64.urlsafe_b64encode(raw).decode().rstrip("="),
                    base64.b32encode(raw).decode().rstrip("=")]
    for needle in needles:
        assert needle not in token, needle
    # The token body does not contain the plaintext JSON either.
    body = base64.urlsafe_b64decode(token.split(".")[2] + "==")
    assert raw_hmac not in body and raw_ed not in body and header_value.encode() not in body


def test_a_token_opens_only_for_its_own_endpoint() -> None:
    token = seal_credentials(RING1, "ep-a", fresh(["whsec_a"]))
    assert open_credentials(RING1, "ep-a", token).secrets == ("whsec_a",)
    for other in ("ep-b", "ep-a ", "EP-A", "ep-", ""):
        with pytest.raises(SealError, match="does not open"):
            open_credentials(RING1, other, token)


def test_a_ring_without_the_key_names_the_missing_key() -> None:
    token = seal_credentials(RING1, EP, fresh(["whsec_a"]))
    with pytest.raises(SealError) as info:
        open_credentials(RING2, EP, token)
    assert "'k1'" in str(info.value)
    assert "k2" in str(info.value)  # what the ring does hold


def test_a_ring_holding_the_key_among_others_opens() -> None:
    creds = fresh(["whsec_a"], [("H", "v")])
    assert open_credentials(BOTH, EP, seal_credentials(RING1, EP, creds)) == creds
    assert open_credentials(RING2, EP, seal_credentials(BOTH, EP, creds)) == creds


def test_resealing_under_a_new_first_key_keeps_the_credentials() -> None:
    creds = _creds(("whsec_n", None), ("whsec_o", _at(10)), headers=(("H", "v"),))
    old = seal_credentials(RING2, EP, creds)
    new = seal_credentials(RING21, EP, open_credentials(RING21, EP, old))
    assert (sealed_key_id(old), sealed_key_id(new)) == ("k2", "k3")
    only_new = KeyRing((RING21.keys[0],))
    assert open_credentials(only_new, EP, new) == creds
    with pytest.raises(SealError, match="'k2'"):
        open_credentials(only_new, EP, old)


def test_an_altered_token_does_not_open() -> None:
    token = seal_credentials(RING1, EP, fresh(["whsec_a"]))
    head, data = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    raw[-1] ^= 1
    altered = f"{head}.{base64.urlsafe_b64encode(bytes(raw)).decode().rstrip('=')}"
    with pytest.raises(SealError):
        open_credentials(RING1, EP, altered)


@pytest.mark.parametrize("token", ["", "whsec_plaintextstoredbymistake", "sealed1.k1.",
                                   "sealed1.k1.!!!", "sealed2.k1.AAAA"])
def test_a_malformed_token_raises_seal_error(token: str) -> None:
    with pytest.raises(SealError):
        open_credentials(RING1, EP, token)


@pytest.mark.parametrize("body", [
    b"not json",
    b"",
    b"[]",
    b'"text"',
    b"42",
    b"null",
    b"{}",
    b'{"secrets": null}',
    b'{"secrets": 5}',
    b'{"secrets": ["whsec_a"]}',
    b'{"secrets": [{"until": null}]}',
    b'{"secrets": [{"value": "whsec_a"}]}',
    b'{"secrets": [{"value": "whsec_a", "until": "not a date"}]}',
    b'{"secrets": [{"value": "whsec_a", "until": 17}]}',
    b'{"secrets": [], "headers": 5}',
    b'{"secrets": [], "headers": [["only-a-name"]]}',
    b'{"secrets": [], "headers": [["a", "b", "c"]]}',
    b'{"secrets": [], "headers": [5]}',
])
def test_a_token_that_opens_but_holds_no_credentials_raises_seal_error(body: bytes) -> None:
    token = seal(RING1, body, EP.encode())
    with pytest.raises(SealError, match="malformed") as info:
        open_credentials(RING1, EP, token)
    assert EP in str(info.value)


def test_the_malformed_message_quotes_nothing_of_the_content() -> None:
    secret = generate_secret()
    body = orjson.dumps({"secrets": [{"value": secret}]})  # no "until": malformed
    with pytest.raises(SealError) as info:
        open_credentials(RING1, EP, seal(RING1, body, EP.encode()))
    assert secret not in str(info.value)
    assert secret.removeprefix("whsec_") not in str(info.value)


def test_a_body_without_headers_opens_with_none() -> None:
    body = orjson.dumps({"secrets": [{"value": "whsec_a", "until": None}]})
    assert open_credentials(RING1, EP, seal(RING1, body, EP.encode())) == fresh(["whsec_a"])


def test_a_naive_end_is_read_as_utc() -> None:
    body = orjson.dumps({"secrets": [{"value": "s", "until": "2030-06-01T13:00:00"}]})
    opened = open_credentials(RING1, EP, seal(RING1, body, EP.encode()))
    assert opened.secrets_until == (_at(60),)
    assert opened.secrets_until[0] is not None and opened.secrets_until[0].tzinfo is not None


def test_seal_refuses_secrets_and_ends_that_do_not_pair_up() -> None:
    with pytest.raises(ValueError):
        seal_credentials(RING1, EP, Credentials(("a", "b"), (None,)))
    with pytest.raises(ValueError):
        seal_credentials(RING1, EP, Credentials(("a",), (None, None)))


# -- rotated ----------------------------------------------------------------------------------


def test_rotating_without_overlap_keeps_only_the_new_secret() -> None:
    creds = _creds(("a", None), ("b", _at(30)), headers=(("H", "v"),))
    assert rotated(creds, "n", now=T0, overlap_until=None) == Credentials(("n",), (None,),
                                                                          (("H", "v"),))


def test_rotating_puts_the_new_secret_first_the_old_ones_until_the_overlap() -> None:
    creds = fresh(["a"], [("H", "v")])
    new = rotated(creds, "n", now=T0, overlap_until=_at(60))
    assert new == Credentials(("n", "a"), (None, _at(60)), (("H", "v"),))


def test_rotating_never_lengthens_an_old_secrets_end() -> None:
    creds = _creds(("b", None), ("a", _at(20)))
    new = rotated(creds, "n", now=_at(10), overlap_until=_at(120))
    assert new == _creds(("n", None), ("b", _at(120)), ("a", _at(20)))


def test_rotating_shortens_old_ends_to_the_new_overlap() -> None:
    creds = _creds(("b", None), ("a", _at(100)))
    new = rotated(creds, "n", now=T0, overlap_until=_at(30))
    assert new == _creds(("n", None), ("b", _at(30)), ("a", _at(30)))


def test_rotating_drops_secrets_whose_end_has_come() -> None:
    creds = _creds(("c", None), ("b", _at(10)), ("a", _at(5)))
    new = rotated(creds, "n", now=_at(10), overlap_until=_at(60))  # b ends exactly now
    assert new == _creds(("n", None), ("c", _at(60)))


def test_an_overlap_that_ended_already_keeps_nothing_old() -> None:
    creds = _creds(("b", None), ("a", _at(100)))
    assert rotated(creds, "n", now=_at(10), overlap_until=_at(10)) == _creds(("n", None))
    assert rotated(creds, "n", now=_at(10), overlap_until=_at(5)) == _creds(("n", None))


def test_rotating_to_a_secret_already_kept_does_not_keep_it_twice() -> None:
    creds = _creds(("b", None), ("a", _at(100)))
    assert rotated(creds, "a", now=T0, overlap_until=_at(60)) == _creds(("a", None),
                                                                        ("b", _at(60)))
    assert rotated(creds, "b", now=T0, overlap_until=_at(60)) == _creds(("b", None),
                                                                        ("a", _at(60)))


def test_at_most_max_retiring_secrets_old_ones_stay_the_newest() -> None:
    assert MAX_RETIRING_SECRETS == 3
    creds = _creds(("e", None), ("d", _at(50)), ("c", _at(50)), ("b", _at(50)), ("a", _at(50)))
    new = rotated(creds, "n", now=T0, overlap_until=_at(60))
    assert new == _creds(("n", None), ("e", _at(60)), ("d", _at(50)), ("c", _at(50)))


def test_the_cap_counts_only_secrets_still_signing() -> None:
    creds = _creds(("d", None), ("c", _at(1)), ("b", _at(50)), ("a", _at(50)))
    new = rotated(creds, "n", now=_at(2), overlap_until=_at(60))  # c has ended
    assert new == _creds(("n", None), ("d", _at(60)), ("b", _at(50)), ("a", _at(50)))


def test_repeated_rotations_stay_bounded() -> None:
    creds = fresh(["s0"])
    for n in range(1, 10):
        creds = rotated(creds, f"s{n}", now=_at(n), overlap_until=_at(n + 60))
        assert len(creds.secrets) == min(n + 1, MAX_RETIRING_SECRETS + 1)
        assert len(creds.secrets_until) == len(creds.secrets)
    assert creds.secrets == ("s9", "s8", "s7", "s6")
    # Each ends 60 minutes after the rotation that retired it.
    assert creds.secrets_until == (None, _at(69), _at(68), _at(67))


def test_rotating_keeps_the_headers_and_does_not_touch_the_input() -> None:
    creds = _creds(("a", None), headers=(("H1", "1"), ("H2", "2")))
    copy = dataclasses.replace(creds)
    new = rotated(creds, "n", now=T0, overlap_until=_at(5))
    assert new.headers == (("H1", "1"), ("H2", "2"))
    assert creds == copy


def test_rotated_credentials_survive_sealing() -> None:
    creds = rotated(_creds(("b", None), ("a", _at(20))), "n", now=T0, overlap_until=_at(60))
    assert open_credentials(RING1, EP, seal_credentials(RING1, EP, creds)) == creds


# -- what signs when (models.Endpoint.signing_secrets over rotated credentials) ----------------


def _endpoint(creds: Credentials) -> Endpoint:
    return Endpoint(id=EP, url="https://x.test/", secrets=creds.secrets,
                    secrets_until=creds.secrets_until)


def test_old_secrets_sign_until_their_end_then_stop() -> None:
    creds = rotated(_creds(("b", None), ("a", _at(20))), "n", now=T0, overlap_until=_at(60))
    ep = _endpoint(creds)
    assert ep.signing_secrets(T0) == ("n", "b", "a")
    assert ep.signing_secrets(_at(20) - timedelta(microseconds=1)) == ("n", "b", "a")
    assert ep.signing_secrets(_at(20)) == ("n", "b")  # an end is exclusive
    assert ep.signing_secrets(_at(60)) == ("n",)
    assert ep.signing_secrets(_at(10_000)) == ("n",)


def test_secrets_without_an_end_always_sign() -> None:
    ep = Endpoint(id=EP, url="https://x.test/", secrets=("a", "b"))  # no ends at all
    assert ep.signing_secrets(_at(10**6)) == ("a", "b")
    ep = Endpoint(id=EP, url="https://x.test/", secrets=("a", "b", "c"),
                  secrets_until=(None, _at(1)))  # fewer ends than secrets: the rest sign
    assert ep.signing_secrets(_at(2)) == ("a", "c")
