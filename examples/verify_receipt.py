"""Verify a rayhorde streaming receipt with nothing but hashlib and the signature library.

    python examples/verify_receipt.py RECEIPT_B64 REQUEST_BODY_FILE RESPONSE_BODY_FILE
"""
import base64, hashlib, json, sys
from bittensor_wallet import Keypair

canon = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
receipt = json.loads(base64.b64decode(sys.argv[1]))
body, job_sig = receipt["body"], bytes.fromhex(receipt["job_sig"])
job_key = Keypair(public_key=body["job_key"]["public"], crypto_type=0)            # ed25519
assert job_key.verify(canon(body), job_sig), "job signature"
miner = Keypair(ss58_address=body["miner_hotkey"])                                # sr25519
assert miner.verify(canon({"body": body, "job_sig": receipt["job_sig"]}), bytes.fromhex(receipt["miner_sig"])), "miner signature"
assert hashlib.sha256(open(sys.argv[2], "rb").read()).hexdigest() == body["input_sha256"], "input hash"
assert hashlib.sha256(open(sys.argv[3], "rb").read()).hexdigest() == body["output_sha256"], "output hash"
print("receipt OK:", body["job_id"], "seq", body["seq"], "request", body["request_id"])
