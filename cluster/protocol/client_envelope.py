"""The client request envelope: what a streaming request's signature covers.

    envelope = {v, job_id, method, path, body_sha256, t, nonce, client_key: {scheme, public}}

sent as headers: ``X-Rayhorde-Request`` (base64 of the canonical envelope JSON) and
``X-Rayhorde-Signature`` (the client key's signature over those canonical bytes, hex). The
request id is sha256 of the canonical envelope (so it is unique per nonce and the keyed sampler
can take its key from it). Both the miner proxy and the job call :func:`check_request`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Callable, Generator, Iterable, Protocol

import httpx
from pydantic import BaseModel, Field, ValidationError

from cluster.errors import RequestRefused
from cluster.protocol.canonical import canonical_bytes
from cluster.protocol.keys import PublicKey, SigningKey

ENVELOPE_VERSION = 1
REQUEST_HEADER = "X-Rayhorde-Request"
SIGNATURE_HEADER = "X-Rayhorde-Signature"


class RequestEnvelope(BaseModel):
    v: int = ENVELOPE_VERSION
    job_id: str
    method: str
    path: str
    body_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    t: int
    nonce: str = Field(min_length=16, max_length=128)
    client_key: PublicKey

    def canonical(self) -> bytes:
        return canonical_bytes(self.model_dump(mode="json"))

    @property
    def request_id(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


class NonceStore(Protocol):
    def check_and_record(self, signer: str, nonce: str, t_ns: int) -> bool: ...


class MemoryNonces:
    """Single-use nonces in memory, forgotten once older than any acceptable clock skew."""

    def __init__(self, keep_s: float) -> None:
        self.keep_ns = int(keep_s * 1e9)
        self.seen: dict[tuple[str, str], int] = {}

    def check_and_record(self, signer: str, nonce: str, t_ns: int) -> bool:
        horizon = t_ns - self.keep_ns
        if len(self.seen) > 100_000:
            self.seen = {k: v for k, v in self.seen.items() if v >= horizon}
        if (signer, nonce) in self.seen:
            return False
        self.seen[(signer, nonce)] = t_ns
        return True


def sign_request(key: SigningKey, *, job_id: str, method: str, path: str, body: bytes,
                 clock: Callable[[], int] = time.time_ns) -> dict[str, str]:
    """The two headers that sign one request."""
    env = RequestEnvelope(job_id=job_id, method=method.upper(), path=path,
                          body_sha256=hashlib.sha256(body).hexdigest(), t=clock(), nonce=secrets.token_hex(16),
                          client_key=key.public)
    raw = env.canonical()
    return {REQUEST_HEADER: base64.b64encode(raw).decode(), SIGNATURE_HEADER: key.sign(raw)}


class RequestSigner(httpx.Auth):
    """httpx auth hook: signs every request it sends (retries are signed afresh). Works with the
    official ``openai`` client through ``http_client=httpx.Client(auth=RequestSigner(...))``."""

    requires_request_body = True

    def __init__(self, key: SigningKey, job_id: str, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.key, self.job_id, self.clock = key, job_id, clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(sign_request(self.key, job_id=self.job_id, method=request.method,
                                            path=request.url.raw_path.decode("ascii"), body=request.content,
                                            clock=self.clock))
        yield request


def check_request(headers: dict[str, str] | httpx.Headers, body: bytes | None, *, method: str, path: str,
                  job_id: str, client_keys: Iterable[PublicKey], nonces: NonceStore, max_skew_s: float,
                  clock: Callable[[], int] = time.time_ns) -> RequestEnvelope:
    """Check a request's envelope; return it, or raise :class:`RequestRefused` naming the problem.

    ``body`` None checks everything but the body (a door that must not read an unsigned body
    checks the headers first); :func:`check_body` then checks the body it read."""
    lower = {k.lower(): v for k, v in dict(headers).items()}
    raw_b64, sig = lower.get(REQUEST_HEADER.lower()), lower.get(SIGNATURE_HEADER.lower())
    if not raw_b64 or not sig:
        raise RequestRefused("unsigned", f"send {REQUEST_HEADER} and {SIGNATURE_HEADER} (use RequestSigner)",
                             status_code=401)
    try:
        raw = base64.b64decode(raw_b64, validate=True)
        env = RequestEnvelope.model_validate_json(raw)
    except (ValueError, ValidationError) as exc:
        raise RequestRefused("malformed", f"{REQUEST_HEADER} is not a request envelope ({type(exc).__name__})",
                             status_code=400) from exc
    if raw != env.canonical():
        raise RequestRefused("malformed", "the request envelope is not in canonical form", status_code=400)
    if env.v != ENVELOPE_VERSION:
        raise RequestRefused("malformed", f"envelope version {env.v}; this job speaks {ENVELOPE_VERSION}",
                             status_code=400)
    if env.job_id != job_id:
        raise RequestRefused("wrong_job", f"request signed for job {env.job_id}, this is job {job_id}",
                             status_code=403)
    if env.method != method.upper() or env.path != path:
        raise RequestRefused("wrong_target", f"signed for {env.method} {env.path}, sent as {method.upper()} {path}",
                             status_code=403)
    if body is not None:
        check_body(env, body)
    if env.client_key not in list(client_keys):
        raise RequestRefused("unknown_client_key", f"client key {env.client_key.public[:16]}... is not registered "
                             "for this job", status_code=403)
    if not env.client_key.verify(raw, sig):
        raise RequestRefused("invalid_signature", "the request signature does not verify for its client key",
                             status_code=401)
    skew_s = (env.t - clock()) / 1e9
    if abs(skew_s) > max_skew_s:
        when = "in the future" if skew_s > 0 else "old"
        raise RequestRefused("clock_skew", f"request is {abs(skew_s):.1f} s {when}; max skew {max_skew_s:g} s "
                             "(check the client's clock)", status_code=401)
    if not nonces.check_and_record(env.client_key.public, env.nonce, env.t):
        raise RequestRefused("replayed", f"nonce {env.nonce} was already used", status_code=401)
    return env


def check_body(env: RequestEnvelope, body: bytes) -> None:
    """The body is the one the envelope's signature covers, or :class:`RequestRefused`."""
    if env.body_sha256 != hashlib.sha256(body).hexdigest():
        raise RequestRefused("body_mismatch", "the body is not the one the client signed", status_code=403)
