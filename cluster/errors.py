"""Every error rayhorde raises, under one root.

    RayhordeError
    ├── UsageError                 you misused it: fix the call, the spec or the config
    │   ├── InvalidSpec            a job spec or message failed validation
    │   │   └── InvalidImageReference  an image reference Docker's grammar does not accept
    │   ├── ConfigError            a settings file, wallet or metagraph is missing or malformed
    │   ├── BadRequest             the LLM app refuses a request it cannot answer verifiably (OpenAI error)
    │   ├── PrivateAddress         a job's URL leads to a loopback / private address, which miners refuse
    │   └── BodyTooLarge           a request body passed the door's size limit (answered 413 before more is read)
    └── ExternalError              something outside the caller failed or said no
        ├── Refused                a peer refused a request; ``reason`` is a stable code
        │   ├── SignatureRejected  bad / missing signature, wrong signer, replay, stale clock
        │   ├── AdmissionRefused   validator-core would not admit a miner
        │   ├── TicketRefused      an agent would not run a ticket
        │   ├── CapabilityRefused  a user capability was refused, expired or over budget
        │   ├── AppRefused         a streaming app is not whitelisted, or its weights are not the pinned ones
        │   ├── RequestRefused     the miner proxy or the job refused a streaming request (client envelope)
        │   └── ImageDenied        validator-core's image allow/deny policy refuses the job's image
        ├── ReceiptInvalid         a streaming receipt failed a check; ``check`` names it
        ├── ClaimRejected          a miner's answer cannot be verified as sent (malformed, unbound); ``reason``
        ├── CollectionFailed       a miner's proxy broke the receipts protocol or its budget; ``reason``
        ├── ProofInvalid           an exported verification proof failed a check; ``check`` names it
        ├── VerifierExiting        a warm verifier was closing when a batch reached it: use a fresh one
        ├── ServiceUnavailable     a service did not answer (down, timed out, connection refused)
        │   ├── JobNotFinished     ``JobHandle.result(timeout_s)`` ran out before a final status
        │   ├── StreamFailed       a streaming job ended, or never became ready
        │   └── CertificateUntrusted  a service's TLS certificate is not signed by a CA the client trusts
        ├── ImageUnavailable       the job's image is not on the miner and could not be pulled
        │   └── ImagePullFailed    the pull failed, timed out or gave another digest
        ├── VolumeError            an input volume could not be prepared; ``reason``
        ├── UploadError            an output upload failed; ``reason``
        ├── TransferStopped        a transfer stopped because another of its stage failed first
        ├── ChainError             the chain refused a call (weights for unknown uids, ...) or failed
        └── EngineError            the container engine failed (not the job's fault)
            └── GpuUnsupported     the miner's NVIDIA container toolkit is missing or too old

Messages name the cause and the fix ("ticket expired 12 s ago; max skew 5 s").
"""

from __future__ import annotations

from typing import Any


class RayhordeError(Exception):
    """Root of every rayhorde error."""


class UsageError(RayhordeError):
    """The caller misused rayhorde: the fix is on the caller's side."""


class InvalidSpec(UsageError):
    """A job spec or message failed validation."""


class ConfigError(UsageError):
    """A settings file, wallet or metagraph is missing or malformed."""


class BadRequest(UsageError):
    """A request the LLM app refuses: its HTTP answer is an OpenAI-style error (``type``, ``param``,
    ``code``) beside rayhorde's ``reason`` (= ``code``) and ``message``. Raised by the app's request
    parsing; the app never lets it escape a request."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request",
                 status: int = 400, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_


class BodyTooLarge(UsageError):
    """A request body passed its door's size limit; raised while it is read, so no more of it is."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(f"{what}; this endpoint takes at most {limit} bytes (send less, or split it)")
        self.limit = limit


class ExternalError(RayhordeError):
    """Something outside the caller failed or refused."""


class Refused(ExternalError):
    """A peer refused a request. ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str, *, status_code: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s  # a door answers it as Retry-After (429, 503)


class SignatureRejected(Refused):
    """A signed message was refused: bad signature, wrong signer, replay or clock skew."""


class AdmissionRefused(Refused):
    """validator-core would not admit a miner."""


class TicketRefused(Refused):
    """A miner agent would not run a ticket."""


class CapabilityRefused(Refused):
    """A capability request or a capability was refused."""


class AppRefused(Refused):
    """A streaming deployment was refused: not whitelisted, or weights that are not the pinned ones."""


class RequestRefused(Refused):
    """A streaming request was refused at the proxy or the job (``reason`` says why)."""


class ReceiptInvalid(ExternalError):
    """A receipt failed a check; ``check`` says which (signature, hash, chain, clock, binding)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"receipt refused ({check}): {message}")
        self.check = check
        self.message = message


class ServiceUnavailable(ExternalError):
    """A service did not answer."""


class JobNotFinished(ServiceUnavailable, TimeoutError):
    """``result(timeout_s)`` ran out before the job reached a final status."""


class StreamFailed(ServiceUnavailable):
    """The streaming job ended (or never became ready): ``view`` (its ``StreamView``) says how."""

    def __init__(self, message: str, view: Any = None) -> None:
        super().__init__(message)
        self.view = view


class CertificateUntrusted(ServiceUnavailable):
    """A service answered TLS with a certificate the client does not trust (another CA, another
    host name, expired): the connection was refused before anything was sent. The fix is the
    client's CA bundle (``--ca-bundle``, ``RAYHORDE_CA_BUNDLE``, ``ca_bundle_path``), or the
    service's certificate."""


class ChainError(ExternalError):
    """The chain (or its local stand-in) refused a call or could not be reached."""


class EngineError(ExternalError):
    """The container engine failed; the job itself is not to blame."""


# --------------------------------------------------------- miner side: images, volumes, uploads, GPU
class InvalidImageReference(InvalidSpec):
    """An image reference that Docker's reference grammar does not accept."""


class ImageDenied(Refused):
    """validator-core's image allow/deny policy refuses this image (reason ``image_denied``, HTTP 403)."""

    def __init__(self, reason: str, message: str, *, status_code: int | None = 403) -> None:
        super().__init__(reason, message, status_code=status_code)


class ImageUnavailable(ExternalError):
    """The job's image is not present on the miner and could not be pulled."""


class ImagePullFailed(ImageUnavailable):
    """A pull failed: ``reason`` is ``image_pull_failed``, ``image_pull_timed_out`` or ``image_digest_mismatch``."""

    stage = "image_pull"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class GpuUnsupported(EngineError):
    """The miner's NVIDIA container toolkit is missing or too old: ``gpu_toolkit_missing`` | ``gpu_toolkit_too_old``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class PrivateAddress(UsageError):
    """A job's URL (or a redirect) leads to a loopback, private or link-local address, which miners refuse."""


class TransferStopped(ExternalError):
    """A download or upload stopped because another one of its stage failed first (that failure is reported)."""


class VolumeError(ExternalError):
    """A job's input volume could not be prepared; ``reason`` is one of ``REASONS``, ``status_code`` the HTTP cause."""

    REASONS = ("download_failed", "volume_too_large", "unsafe_archive", "too_many_files", "invalid_volume", "timeout",
               "cancelled", "miner_io_error")
    # miner_io_error (the miner's disk failed or filled up) is the miner's fault; the rest are the job's

    def __init__(self, reason: str, message: str, *, status_code: int | None = None) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status_code = status_code


class UploadError(ExternalError):
    """A job's output upload failed; ``reason`` is one of ``REASONS``, ``status_code`` the target's HTTP answer."""

    REASONS = ("upload_failed", "timeout", "cancelled", "superseded", "miner_io_error")
    # miner_io_error (the miner could not write the zip) is the miner's fault; the rest are the job's

    def __init__(self, reason: str, message: str, *, status_code: int | None = None) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status_code = status_code


# --------------------------------------------------------------------------------- verification
class ClaimRejected(ExternalError):
    """A miner's answer that cannot be scored as sent (malformed, not bound to its signed request,
    another model's weights); ``reason`` is a stable code, ``position`` the token where it applies."""

    def __init__(self, reason: str, message: str, position: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.position = reason, message, position


class CollectionFailed(ExternalError):
    """A miner's proxy answered a receipts pull with a page that breaks the protocol (not an
    object of typed receipts, more than asked, ``seq`` that does not advance, a request id seen
    before) or its budget (bytes, time). ``reason`` is one of ``REASONS``, ``page`` the page of
    the pass (1 = the first); validator-core charges the miner a ``collection_failed`` incident."""

    REASONS = ("malformed_page", "page_too_long", "seq_not_advancing", "duplicate_request_id", "over_byte_budget",
               "over_time_budget")

    def __init__(self, reason: str, message: str, *, page: int = 1) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.page = reason, message, page


class ProofInvalid(ExternalError):
    """An exported proof failed a check; ``check`` names which."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"proof refused ({check}): {message}")
        self.check, self.message = check, message


class VerifierExiting(ExternalError):
    """A warm verifier met between its idle exit decision and its death: the batch goes to a fresh one."""
