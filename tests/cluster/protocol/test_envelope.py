"""The signed envelope: canonical bytes, signatures, clock skew and replays (every signed message
carries a time and a nonce; a replay or a skewed clock is refused)."""

import pytest

from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.envelope import SignedEnvelope, open_envelope, seal
from cluster.protocol.identity import Hotkey, offset_clock
from cluster.validator.store import DbNonceGuard, open_engine
from cluster.errors import SignatureRejected


@pytest.fixture(scope="module")
def alice():
    return Hotkey.from_uri("//Alice")


def test_canonical_bytes_are_sorted_compact_utf8():
    assert canonical_bytes({"b": 1, "a": ["é", {"d": 2, "c": None}]}) == '{"a":["é",{"c":null,"d":2}],"b":1}'.encode()


def test_floats_are_refused_in_signed_objects():
    with pytest.raises(TypeError, match="floats are not allowed"):
        canonical_bytes({"t": 1.5})


def test_sealed_envelope_opens_and_returns_payload(alice):
    env = seal(alice, "heartbeat", {"running_tickets": ["a"]})
    assert open_envelope(env, kind="heartbeat", max_skew_s=5, signers=[alice.ss58]) == {"running_tickets": ["a"]}


def test_token_round_trip(alice):
    env = seal(alice, "capability", {"x": 1})
    assert SignedEnvelope.from_token(env.to_token()) == env


def test_malformed_token_is_refused():
    with pytest.raises(SignatureRejected) as err:
        SignedEnvelope.from_token("not-a-token")
    assert err.value.reason == "malformed"


def test_tampered_payload_fails_signature(alice):
    env = seal(alice, "heartbeat", {"running_tickets": []})
    env.payload["running_tickets"] = ["forged"]
    with pytest.raises(SignatureRejected) as err:
        open_envelope(env, kind="heartbeat", max_skew_s=5)
    assert err.value.reason == "invalid_signature"


def test_signature_by_another_key_claiming_the_signer_fails(alice):
    mallory = Hotkey.generate()
    env = seal(mallory, "heartbeat", {})
    forged = env.model_copy(update={"signer": alice.ss58})
    with pytest.raises(SignatureRejected, match="does not verify"):
        open_envelope(forged, kind="heartbeat", max_skew_s=5)


def test_wrong_signer_and_wrong_kind_are_named(alice):
    env = seal(alice, "heartbeat", {})
    with pytest.raises(SignatureRejected) as err:
        open_envelope(env, kind="heartbeat", max_skew_s=5, signers=["5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"])
    assert err.value.reason == "wrong_signer"
    with pytest.raises(SignatureRejected) as err:
        open_envelope(env, kind="ticket", max_skew_s=5)
    assert err.value.reason == "wrong_kind" and "expected a 'ticket' message" in err.value.message


@pytest.mark.parametrize("offset_s, word", [(30, "old"), (-30, "in the future")])
def test_skewed_clock_is_refused_with_the_skew_named(alice, offset_s, word):
    env = seal(alice, "heartbeat", {})
    with pytest.raises(SignatureRejected) as err:
        open_envelope(env, kind="heartbeat", max_skew_s=5, clock=offset_clock(offset_s))
    assert err.value.reason == "clock_skew"
    assert f"30.0 s {word}; max skew 5 s" in err.value.message


def test_replay_is_refused_once_recorded(alice, tmp_path):
    guard = DbNonceGuard(open_engine(f"sqlite:///{tmp_path / 'n.db'}"), keep_s=60)
    env = seal(alice, "heartbeat", {})
    open_envelope(env, kind="heartbeat", max_skew_s=5, guard=guard)
    with pytest.raises(SignatureRejected) as err:
        open_envelope(env, kind="heartbeat", max_skew_s=5, guard=guard)
    assert err.value.reason == "replayed"
    # a fresh envelope from the same signer still passes
    open_envelope(seal(alice, "heartbeat", {}), kind="heartbeat", max_skew_s=5, guard=guard)
