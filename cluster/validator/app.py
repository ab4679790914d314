"""validator-core's HTTP API (FastAPI), a thin layer over :class:`ValidatorCore`.

Signed endpoints take a :class:`SignedEnvelope` as the JSON body; user endpoints take a
capability as ``Authorization: Bearer``. Errors are ``{"error": {"reason", "message"}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.http import error_body
from cluster.protocol.messages import ChallengeRequest
from cluster.validator.core import ValidatorCore
from cluster.validator.jobs_door import SubmissionOwners, mount_jobs_door
from cluster.errors import InvalidSpec, Refused, SignatureRejected
from cluster.protocol.jobs import JobSpec
from cluster.protocol.streams import StreamSpec


DRIVER_SCOPES = ("user", "submission", "job")  # the jobs endpoints also take a driver's scope


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
    app = FastAPI(title="rayhorde validator-core", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Refused)
    async def _refused(_: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(error_body(exc.reason, exc.message), status_code=exc.status_code or 403)

    @app.exception_handler(InvalidSpec)
    async def _invalid(_: Request, exc: InvalidSpec) -> JSONResponse:
        return JSONResponse(error_body("invalid_spec", str(exc)), status_code=422)

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
    def scores(cycle: int | None = None, closed: int = 5) -> dict[str, Any]:
        """Public, like the weights on the chain: the running cycle (or ``cycle``) and the last closed ones."""
        if closed < 0 or closed > 100:
            raise Refused("malformed", f"closed={closed}: ask for 0..100 closed cycles", status_code=400)
        if cycle is not None and cycle < 0:
            raise Refused("malformed", f"cycle={cycle}: cycles count from 0 (the Unix epoch)", status_code=400)
        now = core.clock()
        view = core.scoring.scores(core.scoring.cycle_of(now) if cycle is None else cycle, now_ns=now)
        return {"cycle_s": core.settings.score_cycle_s, "current": view.model_dump(mode="json"),
                "closed": [c.model_dump(mode="json") for c in core.scoring.closed(closed)]}

    @app.post("/v1/admission/challenge")
    def challenge(req: ChallengeRequest) -> dict[str, Any]:
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

    @app.post("/v1/jobs/watch")
    def watch(body: dict[str, Any], authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        """Body ``{"known": {job_id: ticket_id | null}, "wait_s": s}``: long-poll several jobs at once."""
        cap = core.capabilities.check(_bearer(authorization), scopes=DRIVER_SCOPES)
        known = body.get("known")
        if not isinstance(known, dict):
            raise Refused("malformed", "body must be {\"known\": {job_id: ticket_id or null}, \"wait_s\": seconds}",
                          status_code=422)
        states = core.organic.watch(cap, known, wait_s=float(body.get("wait_s", 0)))
        return [st.model_dump(mode="json") for st in states]

    @app.post("/v1/heartbeat")
    def heartbeat(body: dict[str, Any]) -> dict[str, Any]:
        env = _signed(body)
        kill = core.admission.heartbeat(env)  # checks the envelope: env.signer is the miner from here on
        return {"ok": True, "kill_tickets": kill,
                "streams": [a.model_dump(mode="json") for a in core.streams.assigned(env.signer)]}

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
    def stream_get(job_id: str, wait_s: float = 0, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """``wait_s``: long-poll up to that many seconds (max 30) until the stream is ready or ended."""
        cap = core.capabilities.check(_bearer(authorization))
        return core.streams.get(cap, job_id, wait_s=wait_s).model_dump(mode="json")

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
    def submit(spec: dict[str, Any], authorization: str | None = Header(default=None)) -> dict[str, Any]:
        cap = core.capabilities.check(_bearer(authorization), scopes=DRIVER_SCOPES)
        try:
            parsed = JobSpec.model_validate(spec)
        except ValidationError as exc:
            raise InvalidSpec(_describe(exc)) from exc
        return core.organic.register(cap, parsed).model_dump()

    @app.get("/v1/jobs")
    def list_jobs(authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        cap = core.capabilities.check(_bearer(authorization), scopes=DRIVER_SCOPES)
        return [v.model_dump(mode="json") for v in core.organic.list(cap)]

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, wait_s: float = 0, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """``wait_s``: long-poll up to that many seconds (max 30) for a final status."""
        cap = core.capabilities.check(_bearer(authorization), scopes=DRIVER_SCOPES)
        return core.organic.get(cap, job_id, wait_s=wait_s).model_dump(mode="json")

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


def _describe(exc: ValidationError) -> str:
    return "job spec is invalid: " + "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()[:8])
