"""``X-Hub-Signature-256`` verification (interface.md "Webhook intake", STYLE.md 2)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.signature import sign, verify

BODY = b'{"zen": "Design for failure.", "hook_id": 1}'
SECRET = b"it's a secret to everybody"


def header(body: bytes, secret: bytes) -> bytes:
    return sign(body, secret).encode("ascii")


def test_sign_is_githubs_format() -> None:
    # The value GitHub documents: "sha256=" + lower-case hex HMAC-SHA256 of the raw body.
    expected = "sha256=" + hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, SECRET) == expected
    assert len(expected) == len("sha256=") + 64


def test_githubs_documented_example() -> None:
    # docs.github.com "Validating webhook deliveries", test values.
    assert verify(
        b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        b"Hello, World!",
        [b"It's a Secret to Everybody"],
    )


def test_correct_signature_is_accepted() -> None:
    assert verify(header(BODY, SECRET), BODY, [SECRET]) is True


@pytest.mark.parametrize("which", [0, 1, 2])
def test_each_of_several_secrets_is_accepted(which: int) -> None:
    # Rotation: old and new secrets side by side, any one of them signs.
    secrets = [b"old secret", b"new secret", b"newest secret"]
    assert verify(header(BODY, secrets[which]), BODY, secrets) is True


def test_a_secret_not_configured_is_refused() -> None:
    assert verify(header(BODY, b"someone else's"), BODY, [SECRET, b"the rotated one"]) is False


def test_signature_of_another_body_is_refused() -> None:
    assert verify(header(BODY + b" ", SECRET), BODY, [SECRET]) is False


def test_upper_case_hex_is_accepted() -> None:
    # GitHub sends lower-case hex; hex is case-insensitive, and signature.py's shape
    # check ([0-9a-fA-F]{64}) accepts either, so an upper-cased digest still verifies.
    good = sign(BODY, SECRET)
    assert verify(("sha256=" + good[7:].upper()).encode(), BODY, [SECRET]) is True


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda good: b"SHA256=" + good[7:], id="upper-case-prefix"),
        pytest.param(lambda good: b"sha512=" + good[7:], id="other-algorithm"),
        pytest.param(lambda good: good[7:], id="no-prefix"),
        pytest.param(lambda good: b"sha256 =" + good[7:], id="space-in-prefix"),
        pytest.param(lambda good: b" " + good, id="leading-space"),
        pytest.param(lambda good: good + b"\n", id="trailing-newline"),
        pytest.param(lambda good: good[:-1], id="63-hex"),
        pytest.param(lambda good: good + b"0", id="65-hex"),
        pytest.param(lambda good: good[:-2], id="62-hex"),
        pytest.param(lambda good: good + good[7:], id="128-hex"),
        pytest.param(lambda good: good[:-1] + b"g", id="non-hex-letter"),
        pytest.param(lambda good: good[:-2] + b"\xc3\xa9", id="non-ascii-utf8"),
        pytest.param(lambda good: good[:-1] + b"\xff", id="non-ascii-byte"),
        pytest.param(lambda good: b"sha256=", id="empty-digest"),
        pytest.param(lambda good: b"", id="empty-header"),
        pytest.param(lambda good: good[:10] + b" " + good[11:], id="space-inside-hex"),
    ],
)
def test_malformed_headers_are_refused(bad: object) -> None:
    good = header(BODY, SECRET)
    value = bad(good)  # type: ignore[operator]
    assert verify(value, BODY, [SECRET]) is False


def test_sha1_signature_is_refused() -> None:
    # The legacy X-Hub-Signature value, even when sent in the SHA-256 header.
    sha1 = b"sha1=" + hmac.new(SECRET, BODY, hashlib.sha1).hexdigest().encode()
    assert verify(sha1, BODY, [SECRET]) is False


def test_missing_header_is_refused() -> None:
    assert verify(None, BODY, [SECRET]) is False


def test_no_secret_configured_accepts_nothing() -> None:
    # Unlike gidgethub's Event.from_http, no secret never means "unsigned is fine".
    assert verify(header(BODY, SECRET), BODY, []) is False
    assert verify(None, BODY, []) is False


def test_empty_body_is_verified_like_any_other() -> None:
    assert verify(header(b"", SECRET), b"", [SECRET]) is True
    assert verify(header(b"", SECRET), b"x", [SECRET]) is False


@given(body=st.binary(max_size=512), secret=st.binary(min_size=1, max_size=64))
def test_property_signed_bodies_verify(body: bytes, secret: bytes) -> None:
    assert verify(header(body, secret), body, [secret]) is True


@given(
    body=st.binary(min_size=1, max_size=512),
    secret=st.binary(min_size=1, max_size=64),
    data=st.data(),
)
def test_property_a_flipped_body_bit_fails(body: bytes, secret: bytes, data: st.DataObject) -> None:
    bit = data.draw(st.integers(0, len(body) * 8 - 1), label="bit")
    flipped = bytearray(body)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert verify(header(body, secret), bytes(flipped), [secret]) is False


@given(
    body=st.binary(max_size=512),
    secret=st.binary(min_size=1, max_size=64),
    bit=st.integers(0, 255),
)
def test_property_a_flipped_signature_bit_fails(body: bytes, secret: bytes, bit: int) -> None:
    digest = bytearray(hmac.new(secret, body, hashlib.sha256).digest())
    digest[bit // 8] ^= 1 << (bit % 8)
    assert verify(b"sha256=" + bytes(digest).hex().encode(), body, [secret]) is False


@given(
    body=st.binary(max_size=256),
    secret=st.binary(min_size=1, max_size=64),
    position=st.integers(0, 70),
    bit=st.integers(0, 7),
)
def test_property_a_flipped_header_bit_never_verifies_another_value(
    body: bytes, secret: bytes, position: int, bit: int
) -> None:
    # Flipping a bit of the header as sent either breaks its shape or changes the
    # digest; the one exception is the case of a hex letter (a <-> A): same digest.
    good = bytearray(header(body, secret))
    flipped = bytearray(good)
    flipped[position] ^= 1 << bit
    same_value = position >= len("sha256=") and bytes(flipped).lower() == bytes(good)
    assert verify(bytes(flipped), body, [secret]) is same_value
