"""The public surfaces are small and exact (new public names are a deliberate change)."""

import cluster
import jobs
import serve_apps


def test_jobs_public_names():
    assert sorted(jobs.__all__) == ["Failure", "FailureKind", "JobHandle", "JobNotFinished", "JobResult", "JobSpec",
                                    "JobStatus", "JobView", "StatusEvent", "submit"]
    assert all(hasattr(jobs, name) for name in jobs.__all__)


def test_cluster_public_names():
    assert sorted(cluster.__all__) == sorted([
        "ExecutorClass", "Hotkey", "LocalChain", "LocalStack", "MinerSettings", "SignedEnvelope", "ValidatorSettings",
        "errors", "load_or_create_wallet", "load_settings", "open_envelope", "request_capability", "seal",
    ])
    assert all(hasattr(cluster, name) for name in cluster.__all__)


def test_serve_apps_public_names():
    assert sorted(serve_apps.__all__) == sorted([
        "RECEIPT_HEADER", "REQUEST_HEADER", "SIGNATURE_HEADER", "PublicKey", "Receipt", "ReceiptBody", "ReceiptChain",
        "ReceiptInvalid", "RequestEnvelope", "RequestRefused", "RequestSigner", "SigningKey", "check_request",
        "job_sign", "miner_countersign", "sign_request", "split_sse", "verify_receipt",
        "AppRefused", "Whitelist", "WhitelistEntry", "weights_digest",
        "Answer", "StreamFailed", "StreamJob", "StreamReady", "StreamSpec", "StreamView", "Streams",
        "VerifyingTransport",
    ])
    assert all(hasattr(serve_apps, name) for name in serve_apps.__all__)
