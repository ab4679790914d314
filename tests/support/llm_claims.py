"""Claims made in this process, for the verifier's tests and the detection benchmark
(``benchmarks/detection.py``). Nothing here is on a production path.

:class:`InProcessJob` is the real LLM app (``serve_apps.llm.LLMApp``) called in-process through
its ASGI request object, with a real client key signing each request envelope and a miner hotkey
counter-signing the job's half of each receipt exactly as the miner proxy does: its claims are the
bytes validator-core would collect (envelope, client signature, request and response bodies,
receipt), only without the HTTP hops. Many requests in flight at once batch in the engine. On a
cheating engine (:mod:`tests.support.cheats`) the same app makes a cheating miner's claims.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from cluster.protocol.client_envelope import REQUEST_HEADER, SIGNATURE_HEADER, RequestEnvelope, sign_request
from cluster.protocol.identity import Hotkey
from cluster.protocol.job_side import JOB_RECEIPT_HEADER, SSE_JOB_PREFIX, parse_job_half
from cluster.protocol.keys import SigningKey
from cluster.protocol.receipts import miner_countersign
from cluster.verification.models import Claim
from serve_apps.inference.engine import InferenceEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass(frozen=True)
class SignedRequest:
    """A client's signed request, before any job answered it (several jobs may answer it: the
    honest one and cheating ones, each with its own nonce store)."""

    path: str
    body: bytes
    envelope: bytes
    client_sig: str

    @property
    def request_id(self) -> str:
        return hashlib.sha256(self.envelope).hexdigest()

    @classmethod
    def from_claim(cls, claim: Claim) -> "SignedRequest":
        env = RequestEnvelope.model_validate_json(claim.envelope)
        return cls(path=env.path, body=claim.request_body, envelope=claim.envelope, client_sig=claim.client_sig)


def sign(client: SigningKey, job_id: str, route: str, body: dict) -> SignedRequest:
    raw = json.dumps(body).encode()
    path = f"/jobs/{job_id}{route}"
    headers = sign_request(client, job_id=job_id, method="POST", path=path, body=raw)
    return SignedRequest(path=path, body=raw, envelope=base64.b64decode(headers[REQUEST_HEADER]),
                         client_sig=headers[SIGNATURE_HEADER])


class InProcessJob:
    """One streaming job of the LLM app on ``engine``, called in-process (see the module doc)."""

    def __init__(self, engine: InferenceEngine, *, job_id: str = "job-verify", miner: Hotkey | None = None,
                 client: SigningKey | None = None, max_skew_s: float = 600) -> None:
        from serve_apps.llm import LLMApp

        self.job_id = job_id
        self.prefix = f"/jobs/{job_id}"
        self.miner = miner or Hotkey.from_uri("//Bob")
        self.client = client or SigningKey()
        self.engine = engine
        # weights_sha256=None: the app takes the engine's word for its digest, as a lying miner's would
        self.app = LLMApp(job_id, self.miner.ss58, [self.client.public.model_dump()], route_prefix=self.prefix,
                          engine=engine, max_skew_s=max_skew_s)

    @property
    def model(self) -> str:
        return self.engine.model_name

    def sign(self, route: str, body: dict) -> SignedRequest:
        return sign(self.client, self.job_id, route, body)

    async def ask(self, route: str, body: dict) -> Claim:
        """Send one signed request to the app; return the claim a validator would collect."""
        return await self.answer(self.sign(route, body))

    async def reanswer(self, claim: Claim) -> Claim:
        """Answer the very request of ``claim`` (same envelope, same client signature, so the same
        request id and sampling key) with this job's engine: how a cheating miner answers a
        client's request. This job must have the claim's job id and client key."""
        return await self.answer(SignedRequest.from_claim(claim))

    async def answer(self, req: SignedRequest) -> Claim:
        headers = {REQUEST_HEADER: base64.b64encode(req.envelope).decode(), SIGNATURE_HEADER: req.client_sig}
        return await self._call(req.path, req.body, headers)

    def answer_many(self, requests: Sequence[SignedRequest]) -> list[Claim]:
        """All requests in flight at once (the engine batches them); claims in order."""
        async def go():
            return await asyncio.gather(*(self.answer(r) for r in requests))
        return list(asyncio.run(go()))

    async def _call(self, path: str, raw: bytes, headers: dict[str, str]) -> Claim:
        from starlette.requests import Request
        from starlette.responses import StreamingResponse

        sent = False

        async def receive():
            nonlocal sent
            if sent:
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in
                             {**headers, "content-type": "application/json"}.items()],
                 "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
                 "root_path": ""}
        resp = await self.app(Request(scope, receive))
        if resp.status_code != 200:
            raise RuntimeError(f"the app answered {resp.status_code}: {getattr(resp, 'body', b'')[:300]!r}")
        if isinstance(resp, StreamingResponse):
            out = b""
            half = None
            async for chunk in resp.body_iterator:
                chunk = chunk.encode() if isinstance(chunk, str) else chunk
                if chunk.startswith(SSE_JOB_PREFIX):
                    half = chunk[len(SSE_JOB_PREFIX):].strip()
                    break
                out += chunk
        else:
            out, half = resp.body, resp.headers[JOB_RECEIPT_HEADER]
        receipt_body, job_sig = parse_job_half(half)
        if receipt_body.output_sha256 != hashlib.sha256(out).hexdigest():
            raise RuntimeError("the job's receipt does not bind its answer")
        receipt = miner_countersign(self.miner, receipt_body, job_sig)  # what the miner proxy does
        return Claim(job_id=self.job_id, miner_hotkey=self.miner.ss58, weights_sha256=self.engine.weights_sha256,
                     route_prefix=self.prefix, envelope=base64.b64decode(headers[REQUEST_HEADER]),
                     client_sig=headers[SIGNATURE_HEADER], request_body=raw, response_body=out, receipt=receipt)

    def ask_many(self, requests: Sequence[tuple[str, dict]]) -> list[Claim]:
        return self.answer_many([self.sign(route, body) for route, body in requests])

    def reanswer_many(self, claims: Sequence[Claim]) -> list[Claim]:
        return self.answer_many([SignedRequest.from_claim(c) for c in claims])

    def resign(self, claim: Claim, response_body: bytes) -> Claim:
        """The same claim with other response bytes and a receipt re-signed over them (a miner
        holds the job key's host: it can sign what it likes; only the verifier's checks remain)."""
        body = claim.receipt.body.model_copy(update={"output_sha256": hashlib.sha256(response_body).hexdigest(),
                                                     "job_key": self.app.side.key.public})
        job_sig = self.app.side.key.sign(body.canonical())
        return claim.model_copy(update={"response_body": response_body,
                                        "receipt": miner_countersign(self.miner, body, job_sig)})


def answer_ids(claim: Claim) -> list[int]:
    """The output ids of a claim's answer (JSON or SSE), as the verifier reads them."""
    raw = claim.response_body
    if raw.lstrip().startswith(b"{"):
        return list(json.loads(raw)["choices"][0]["token_ids"])
    ids: list[int] = []
    for line in raw.decode().split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices") or []:
                ids.extend(choice.get("token_ids", []))
    return ids


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two id lists differ (one ending early counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
