"""Exported proofs (the signature half): a proof built from a real
collected claim verifies in another process with nothing but its bytes, and editing any byte
of it makes the check fail. (Re-scoring with the model is exercised with the real verifier in
the LLM verification tests.)"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from cluster.protocol.envelope import seal
from cluster.protocol.identity import Hotkey
from cluster.verification.collector import pull
from cluster.verification.models import Verdict
from cluster.errors import ProofInvalid
from cluster.verification.proof import check_proof, make_proof
from cluster.protocol.streams import READY_KIND, StreamReady
from tests.cluster.verification.test_collector import MINER, VALIDATOR, served  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration
DIGEST = "ab" * 32


@pytest.fixture
def proof_bytes(served):  # noqa: F811
    _, source, front = served
    with httpx.Client(timeout=10) as http:
        claim = pull(source, VALIDATOR, http).claims[1]
    claim = claim.model_copy(update={"weights_sha256": DIGEST})
    readiness = seal(MINER, READY_KIND, StreamReady(job_id=source.job_id, job_key=source.job_key,
                                                    proxy_url=front.url, weights_sha256=DIGEST))
    verdict = Verdict(request_id=claim.request_id, job_id=claim.job_id, miner_hotkey=claim.miner_hotkey, ok=False,
                      reason="not_argmax", position=3, margin=0.05, weights_sha256=DIGEST, verifier="test")
    return make_proof(claim, readiness, verdict, 0.05, VALIDATOR)


def test_a_proof_checks_in_another_process_and_any_edited_byte_fails(proof_bytes, tmp_path):
    assert check_proof(proof_bytes).verdict.reason == "not_argmax"
    path = tmp_path / "proof.json"
    path.write_bytes(proof_bytes)
    ok = subprocess.run([sys.executable, "-m", "cluster.cli.main", "verify-proof", str(path), "--no-rescore"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "proof verified" in ok.stdout and "not_argmax at position 3" in ok.stdout
    step = max(1, len(proof_bytes) // 150)
    for i in range(0, len(proof_bytes), step):  # ~150 single-byte edits spread over the whole file
        edited = bytearray(proof_bytes)
        edited[i] = (edited[i] + 1) % 256
        with pytest.raises(ProofInvalid):
            check_proof(bytes(edited))
    edited = bytearray(proof_bytes)
    edited[len(edited) // 2] ^= 0x04
    path.write_bytes(bytes(edited))
    bad = subprocess.run([sys.executable, "-m", "cluster.cli.main", "verify-proof", str(path), "--no-rescore"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "proof refused" in bad.stderr


def test_a_proof_signed_by_someone_else_or_for_other_weights_is_refused(proof_bytes):
    import json

    from cluster.protocol.canonical import canonical_bytes
    doc = json.loads(proof_bytes)
    doc["validator"] = Hotkey.from_uri("//Dave").ss58
    with pytest.raises(ProofInvalid) as err:
        check_proof(canonical_bytes(doc))
    assert err.value.check == "validator_signature"
