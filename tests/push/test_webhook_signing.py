"""Standard Webhooks signing and verification."""

from __future__ import annotations

import pytest

from telemetry.webhooks import (
    InvalidSecret,
    InvalidSignature,
    generate_secret,
    secret_key,
    sign,
    signature_header,
    verify,
)

# The test vector published with the Standard Webhooks specification.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(signature: str, *, webhook_id: str = VECTOR_ID, timestamp: int = VECTOR_TIMESTAMP) -> dict[str, str]:
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def test_sign_matches_specification_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE


def test_verify_accepts_specification_vector() -> None:
    accepted = verify([VECTOR_SECRET], headers(VECTOR_SIGNATURE), VECTOR_BODY, now=VECTOR_TIMESTAMP + 10)
    assert accepted == VECTOR_ID


def test_verify_accepts_any_listed_secret_and_any_signature() -> None:
    other = generate_secret()
    both = signature_header([other, VECTOR_SECRET], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
    assert both.split(" ")[1] == VECTOR_SIGNATURE
    assert verify([VECTOR_SECRET], headers(both), VECTOR_BODY, now=VECTOR_TIMESTAMP) == VECTOR_ID
    assert verify([generate_secret(), other], headers(both), VECTOR_BODY, now=VECTOR_TIMESTAMP) == VECTOR_ID


@pytest.mark.parametrize(
    ("changed", "reason"),
    [
        ({"body": b'{"test": 2432232315}'}, "no_matching_signature"),
        ({"webhook_id": "msg_other"}, "no_matching_signature"),
        ({"secret": "whsec_" + "QUFB" * 8}, "no_matching_signature"),
        ({"now": VECTOR_TIMESTAMP + 301}, "timestamp_out_of_tolerance"),
        ({"now": VECTOR_TIMESTAMP - 301}, "timestamp_out_of_tolerance"),
    ],
    ids=["body", "id", "secret", "too-old", "too-new"],
)
def test_verify_rejects(changed: dict, reason: str) -> None:
    body = changed.get("body", VECTOR_BODY)
    secret = changed.get("secret", VECTOR_SECRET)
    now = changed.get("now", VECTOR_TIMESTAMP)
    request = headers(VECTOR_SIGNATURE, webhook_id=changed.get("webhook_id", VECTOR_ID))
    with pytest.raises(InvalidSignature) as raised:
        verify([secret], request, body, now=now)
    assert raised.value.reason == reason


def test_verify_rejects_missing_and_bad_headers() -> None:
    with pytest.raises(InvalidSignature) as missing:
        verify([VECTOR_SECRET], {"webhook-id": VECTOR_ID}, VECTOR_BODY, now=VECTOR_TIMESTAMP)
    assert missing.value.reason == "missing_header"
    bad = {**headers(VECTOR_SIGNATURE), "webhook-timestamp": "yesterday"}
    with pytest.raises(InvalidSignature) as invalid:
        verify([VECTOR_SECRET], bad, VECTOR_BODY, now=VECTOR_TIMESTAMP)
    assert invalid.value.reason == "invalid_timestamp"


def test_unversioned_signature_is_ignored() -> None:
    bare = VECTOR_SIGNATURE.removeprefix("v1,")
    with pytest.raises(InvalidSignature):
        verify([VECTOR_SECRET], headers(f"v2,{bare} {bare}"), VECTOR_BODY, now=VECTOR_TIMESTAMP)


@pytest.mark.parametrize(
    "secret",
    ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ="],
    ids=["no-prefix", "not-base64", "too-short"],
)
def test_invalid_secrets(secret: str) -> None:
    with pytest.raises(InvalidSecret):
        secret_key(secret)


def test_generated_secret_has_32_byte_key() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(secret_key(secret)) == 32
    assert secret != generate_secret()
