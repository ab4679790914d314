"""validator-core's HTTP API (FastAPI), a thin layer over :class:`ValidatorCore`.

Signed endpoints take a :class:`SignedEnvelope` as the JSON body; user endpoints take a
capability as ``Authorization: Bearer``. Errors are ``{"error": {"reason", "message"}}``, the
framework's own too (no route, a method the route does not take, a body that is no JSON); nothing
redirects. Whatever a client sends is answered 2xx or 4xx (tests/cluster/validator/test_fuzz.py
fuzzes it): a 5xx means validator-core or what it drives failed.

Load one client cannot turn against the others (:mod:`.limits`): a body over its limit is refused
before it is read; every number is finite and ranged (422); long-polls wait on the event loop
holding no thread, a few per capability; heartbeats run on threads of their own, which a tick of
:class:`~cluster.validator.limits.Uptime` also passes through, so a stall of that path charges no
miner; the endpoints anyone may call are rate-limited per address (429 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.http import error_body, framework_error_body
from cluster.protocol.messages import ChallengeRequest
from cluster.validator.core import ValidatorCore
from cluster.validator.jobs_door import MAX_SUBMIT_BYTES, SubmissionOwners, mount_jobs_door
from cluster.validator.limits import BodyLimit, PollSlots, RateLimit
from cluster.errors import InvalidSpec, Refused, SignatureRejected
from cluster.protocol.jobs import MAX_WAIT_S, JobSpec, WatchRequest
from cluster.protocol.numbers import INT64_MAX
from cluster.protocol.streams import StreamSpec
from cluster.settings import ValidatorSettings


DRIVER_SCOPES = ("user", "submission", "job")  # the jobs endpoints also take a driver's scope
WAIT_S = Query(default=0, ge=0, le=MAX_WAIT_S, allow_inf_nan=False,
               description="long-poll up to this many seconds (finite, 0..30)")


def _nothing() -> None:
    """What an Uptime tick does on the heartbeat threads: it only needs to get through."""


def _signed(body: Any) -> SignedEnvelope:
    try:
        return SignedEnvelope.model_validate(body)
    except ValidationError as exc:
        raise SignatureRejected("unsigned", "this endpoint takes a signed envelope {v, kind, payload, signer, t, "
                                f"nonce, sig}}; got something else ({exc.error_count()} problems)",
                                status_code=401) from exc


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.startswith("Bearer "):
        return authorization[len("Bearer "):].strip()
    return None


def build_app(core: ValidatorCore, *, jobs_dashboard_url: str | None = None, ray_token: str = "") -> FastAPI:
    """validator-core's app; with ``jobs_dashboard_url`` (and the cluster's ``ray_token``), also
    the Jobs gateway to that dashboard."""
    settings = core.settings
    beats = ThreadPoolExecutor(settings.heartbeat_threads, thread_name_prefix="heartbeats")
    public = RateLimit(settings.public_rate_per_s, settings.public_burst)
    polls = PollSlots(settings.long_polls_per_capability)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loop = asyncio.get_running_loop()
        ticks = asyncio.ensure_future(core.uptime.run(lambda: loop.run_in_executor(beats, _nothing)))
        try:
            yield
        finally:
            ticks.cancel()
            beats.shutdown(wait=False)

    # redirect_slashes=False: a path with a slash too many is a 404 in the error shape, not a 307
    app = FastAPI(title="rayhorde validator-core", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit_for=lambda path: body_limit(settings, path))

    def rate_limited(request: Request, what: str) -> None:
        public.take(request.client.host if request.client else "", what)

    @app.exception_handler(Refused)
    async def _refused(_: Request, exc: Refused) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s else None
        return JSONResponse(error_body(exc.reason, exc.message), status_code=exc.status_code or 403, headers=headers)

    @app.exception_handler(InvalidSpec)
    async def _invalid(_: Request, exc: InvalidSpec) -> JSONResponse:
        return JSONResponse(error_body("invalid_spec", str(exc)), status_code=422)

    @app.exception_handler(HTTPException)  # the framework's own: no route, wrong method, a body that is no JSON
    async def _framework(request: Request, exc: HTTPException) -> JSONResponse:
        body = framework_error_body(exc.status_code, exc.detail, method=request.method, path=request.url.path,
                                    allow=(exc.headers or {}).get("Allow"))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def _malformed(_: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if hasattr(exc, "errors") else []
        parts = ["{}: {}".format(".".join(str(p) for p in e.get("loc", ()) if p != "body"), e.get("msg"))
                 for e in errors[:8]]
        return JSONResponse(error_body("malformed", "; ".join(parts) or str(exc)), status_code=422)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "validator": core.hotkey.ss58, "time_ns": core.clock()}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return core.cluster_status()

    @app.get("/v1/scores")
    def scores(request: Request, cycle: int | None = Query(default=None, ge=0, le=2**40),
               closed: int = Query(default=5, ge=0, le=100)) -> dict[str, Any]:
        """Public, like the weights on the chain: the running cycle (or ``cycle``, counted from the
        Unix epoch) and the last ``closed`` closed ones."""
        rate_limited(request, "/v1/scores")
        last = INT64_MAX // core.scoring.cycle_ns - 1  # the last cycle whose end is a 64-bit Unix ns
        if cycle is not None and cycle > last:
            raise Refused("malformed", f"cycle {cycle} ends after the last time a 64-bit Unix ns holds; cycles of "
                          f"{settings.score_cycle_s:g} s end at {last}: ask for one up to that", status_code=422)
        now = core.clock()
        view = core.scoring.scores(core.scoring.cycle_of(now) if cycle is None else cycle, now_ns=now)
        return {"cycle_s": core.settings.score_cycle_s, "current": view.model_dump(mode="json"),
                "closed": [c.model_dump(mode="json") for c in core.scoring.closed(closed)]}

    @app.post("/v1/admission/challenge")
    def challenge(req: ChallengeRequest, request: Request) -> dict[str, Any]:
        rate_limited(request, "/v1/admission/challenge")  # unsigned, and it writes a row
        return core.admission.challenge(req).model_dump()

    @app.post("/v1/admission/join")
    def join(body: dict[str, Any], request: Request) -> dict[str, Any]:
        peer = request.client.host if request.client else None  # what the firewall admits
        return core.admission.join(_signed(body), peer).model_dump()

    @app.post("/v1/admission/node")
    def node(body: dict[str, Any]) -> dict[str, Any]:
        core.admission.node_started(_signed(body))
        return {"ok": True}

    @app.post("/v1/admission/preflight")
    def preflight(body: dict[str, Any], request: Request) -> dict[str, Any]:
        peer = request.client.host if request.client else ""
        return core.admission.preflight(_signed(body), peer).model_dump(mode="json")

    @app.post("/v1/admission/node_lost")
    def node_lost(body: dict[str, Any]) -> dict[str, Any]:
        core.admission.node_lost(_signed(body))
        return {"ok": True}

    async def checked(authorization: str | None, scopes: tuple[str, ...] | None = None):
        kwargs = {} if scopes is None else {"scopes": scopes}
        return await asyncio.to_thread(core.capabilities.check, _bearer(authorization), **kwargs)

    @app.post("/v1/jobs/watch")
    async def watch(req: WatchRequest, authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        """Body ``{"known": {job_id: ticket_id | null}, "wait_s": s}``: long-poll several jobs at once."""
        cap = await checked(authorization, DRIVER_SCOPES)
        with polls.hold(cap.capability_id):
            states = await core.organic.watch_async(cap, req.known, wait_s=req.wait_s)
        return [st.model_dump(mode="json") for st in states]

    @app.post("/v1/heartbeat")
    async def heartbeat(body: dict[str, Any]) -> dict[str, Any]:
        """On threads of its own: no other load can keep a miner's heartbeat waiting."""
        def beat() -> dict[str, Any]:
            env = _signed(body)
            kill = core.admission.heartbeat(env)  # checks the envelope: env.signer is the miner from here on
            return {"ok": True, "kill_tickets": kill,
                    "streams": [a.model_dump(mode="json") for a in core.streams.assigned(env.signer)]}
        return await asyncio.get_running_loop().run_in_executor(beats, beat)

    @app.post("/v1/streams")
    def stream_deploy(spec: dict[str, Any], authorization: str | None = Header(default=None)) -> dict[str, Any]:
        cap = core.capabilities.check(_bearer(authorization))
        try:
            parsed = StreamSpec.model_validate(spec)
        except ValidationError as exc:
            raise InvalidSpec(_describe(exc).replace("job spec", "stream spec")) from exc
        return core.streams.deploy(cap, parsed).model_dump(mode="json")

    @app.get("/v1/streams")
    def stream_list(authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        cap = core.capabilities.check(_bearer(authorization))
        return [v.model_dump(mode="json") for v in core.streams.list(cap)]

    @app.get("/v1/streams/{job_id}")
    async def stream_get(job_id: str, wait_s: float = WAIT_S,
                         authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """``wait_s``: long-poll up to that many seconds (max 30) until the stream is ready or ended."""
        cap = await checked(authorization)
        with polls.hold(cap.capability_id):
            return (await core.streams.get_async(cap, job_id, wait_s=wait_s)).model_dump(mode="json")

    @app.post("/v1/streams/{job_id}/terminate")
    def stream_terminate(job_id: str, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        cap = core.capabilities.check(_bearer(authorization))
        return core.streams.terminate(cap, job_id).model_dump(mode="json")

    @app.get("/v1/streams/{job_id}/verdicts/{request_id}/proof")
    def stream_proof(job_id: str, request_id: str, authorization: str | None = Header(default=None)) -> Response:
        """The self-contained proof of one verdict (``rayhorde verify-proof`` checks it)."""
        cap = core.capabilities.check(_bearer(authorization))
        core.streams.get(cap, job_id)  # the job's owner only (its bodies are the user's)
        claim, _, _ = core.verification.verdict(request_id)
        if claim is None or claim.job_id != job_id:
            raise Refused("not_found", f"no verdict for request {request_id} of job {job_id}", status_code=404)
        return Response(core.verification.proof(request_id), media_type="application/json")

    @app.post("/v1/streams/{job_id}/ready")
    def stream_ready(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        core.streams.ready(job_id, _signed(body))
        return {"ok": True}

    @app.post("/v1/capabilities")
    def capability(body: dict[str, Any]) -> dict[str, Any]:
        return {"capability": core.capabilities.issue(_signed(body))}

    @app.post("/v1/jobs")
    async def submit(request: Request, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """The capability first: a spec may be large (inline volumes), and only a user's is read."""
        cap = await checked(authorization, DRIVER_SCOPES)
        raw = await request.body()  # within max_spec_bytes (BodyLimit)
        try:
            parsed = JobSpec.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidSpec(_describe(exc)) from exc
        return (await asyncio.to_thread(core.organic.register, cap, parsed)).model_dump()

    @app.get("/v1/jobs")
    def list_jobs(authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        cap = core.capabilities.check(_bearer(authorization), scopes=DRIVER_SCOPES)
        return [v.model_dump(mode="json") for v in core.organic.list(cap)]

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, wait_s: float = WAIT_S,
                      authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """``wait_s``: long-poll up to that many seconds (max 30) for a final status."""
        cap = await checked(authorization, DRIVER_SCOPES)
        with polls.hold(cap.capability_id):
            return (await core.organic.get_async(cap, job_id, wait_s=wait_s)).model_dump(mode="json")

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        cap = core.capabilities.check(_bearer(authorization), scopes=DRIVER_SCOPES)
        return core.organic.cancel(cap, job_id).model_dump(mode="json")

    @app.post("/v1/jobs/{job_id}/scope")
    def job_scope(job_id: str, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """A token that follows (and may cancel) this one job: what ``rayhorde job run`` hands its
        driver instead of the capability (a driver's token is readable by every cluster member)."""
        cap = core.capabilities.check(_bearer(authorization))
        return {"scope": core.capabilities.scope(cap, job_id=job_id)}

    @app.post("/v1/tickets/current")
    def ticket_current(body: dict[str, Any]) -> dict[str, Any]:
        return {"current": core.organic.ticket_current(_signed(body))}

    @app.post("/v1/tickets/fetch")
    def fetch_ticket(body: dict[str, Any]) -> dict[str, Any]:
        return core.organic.fetch_ticket(_signed(body))

    @app.post("/v1/jobs/{job_id}/status")
    def report_status(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        core.organic.report_status(job_id, _signed(body))
        return {"ok": True}

    @app.post("/v1/jobs/{job_id}/result")
    def report_result(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        core.organic.report_result(job_id, _signed(body))
        return {"ok": True}

    if jobs_dashboard_url:  # stock `ray job submit` from other hosts (the dashboard binds 127.0.0.1)
        mount_jobs_door(app, jobs_dashboard_url, ray_token=ray_token, authorize=core.capabilities.check,
                        owners=SubmissionOwners(core.engine, core.clock),
                        scope=lambda cap, sid: core.capabilities.scope(cap, submission_id=sid),
                        validator_url=core.settings.url,
                        ca_bundle=str(core.settings.ca_bundle_path) if core.settings.ca_bundle_path else None)
    return app


def body_limit(settings: ValidatorSettings, path: str) -> int:
    """The most body bytes a request to ``path`` may send: job specs (inline volumes), job results
    (artifacts, logs) and the Jobs gateway's working-dir uploads have limits of their own."""
    if path == "/v1/jobs":
        return settings.max_spec_bytes
    if path.startswith("/v1/jobs/") and path.endswith("/result"):
        return settings.max_result_bytes
    if path.startswith("/api/packages/"):
        return settings.max_package_bytes
    if path.startswith("/api/jobs"):
        return MAX_SUBMIT_BYTES
    return settings.max_body_bytes


def _describe(exc: ValidationError) -> str:
    return "job spec is invalid: " + "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()[:8])
