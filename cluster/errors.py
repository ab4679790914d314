"""Every error rayhorde raises, under one root.

    RayhordeError
    ├── UsageError                 you misused it: fix the call, the spec or the config
    │   ├── InvalidSpec            a job spec or message failed validation
    │   └── ConfigError            a settings file, wallet or metagraph is missing or malformed
    └── ExternalError              something outside the caller failed or said no
        ├── Refused                a peer refused a request; ``reason`` is a stable code
        │   ├── SignatureRejected  bad / missing signature, wrong signer, replay, stale clock
        │   ├── AdmissionRefused   validator-core would not admit a miner
        │   ├── TicketRefused      an agent would not run a ticket
        │   ├── CapabilityRefused  a user capability was refused, expired or over budget
        │   └── AppRefused         a streaming app is not whitelisted, or its weights are not the pinned ones
        ├── ServiceUnavailable     a service did not answer (down, timed out, connection refused)
        ├── ChainError             the chain refused a call (weights for unknown uids, ...) or failed
        └── EngineError            the container engine failed (not the job's fault)

Messages name the cause and the fix ("ticket expired 12 s ago; max skew 5 s").
"""

from __future__ import annotations


class RayhordeError(Exception):
    """Root of every rayhorde error."""


class UsageError(RayhordeError):
    """The caller misused rayhorde: the fix is on the caller's side."""


class InvalidSpec(UsageError):
    """A job spec or message failed validation."""


class ConfigError(UsageError):
    """A settings file, wallet or metagraph is missing or malformed."""


class ExternalError(RayhordeError):
    """Something outside the caller failed or refused."""


class Refused(ExternalError):
    """A peer refused a request. ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str, *, status_code: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.status_code = status_code


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


class ServiceUnavailable(ExternalError):
    """A service did not answer."""


class ChainError(ExternalError):
    """The chain (or its local stand-in) refused a call or could not be reached."""


class EngineError(ExternalError):
    """The container engine failed; the job itself is not to blame."""
