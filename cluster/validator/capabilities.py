"""validator-core's capabilities: what a whitelisted user may start, signed by this validator.

A user asks with a signed ``capability_request`` (addressed to this validator, ``ttl_s`` at most
``capability_max_ttl_s``) and gets a capability token: ``{capability_id, user, max_jobs,
expires_ns}`` sealed by this validator, sent back as ``Authorization: Bearer`` with every user
request. Checking it needs no database (the signature and the expiry); the budget does: each
job started (organic or streaming) spends one of ``max_jobs`` in the row kept here, in the same
transaction that creates the job.

Scopes: a Ray driver holds its token where every cluster member can read it (the job table,
runtime envs), so it never holds the user's capability but a scope minted from it (see
:class:`~cluster.protocol.messages.Capability`): one ``ray job submit``'s (the Jobs gateway swaps
the capability for it) or one job's (``rayhorde job run``). A scope is a capability row of its
own whose ``parent_id`` names the user's: starting a job spends both budgets. What a stolen scope
allows: start jobs on its parent's budget until it expires (submission), follow or cancel one
job (job); never read the user's other jobs, start streams, or use the gateway.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from cluster.errors import CapabilityRefused, Refused, SignatureRejected
from cluster.protocol.canonical import NS
from cluster.protocol.envelope import SignedEnvelope, open_envelope, seal
from cluster.protocol.identity import Clock, Hotkey
from cluster.protocol.messages import Capability, CapabilityRequest
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.envelopes import EnvelopeOpener


class CapabilityDesk:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, engine: sa.Engine, opener: EnvelopeOpener,
                 clock: Clock) -> None:
        self.settings = settings
        self.hotkey = hotkey
        self.engine = engine
        self.opener = opener
        self.clock = clock

    def issue(self, env: SignedEnvelope) -> str:
        """A capability token for the whitelisted user who signed ``env``."""
        req = CapabilityRequest.model_validate(self.opener.open(env, "capability_request"))
        if req.validator != self.hotkey.ss58:
            raise CapabilityRefused("wrong_validator", f"request is addressed to {req.validator}, this validator is "
                                    f"{self.hotkey.ss58}", status_code=403)
        if env.signer not in self.settings.users:
            raise CapabilityRefused("not_whitelisted", f"user {env.signer} is not on this validator's user whitelist; "
                                    "ask its operator to add the hotkey to `users`", status_code=403)
        if req.ttl_s > self.settings.capability_max_ttl_s:
            raise CapabilityRefused("ttl_too_long", f"ttl_s {req.ttl_s} exceeds this validator's maximum "
                                    f"{self.settings.capability_max_ttl_s:g} s", status_code=400)
        cap = Capability(capability_id=uuid.uuid4().hex, user=env.signer, max_jobs=req.max_jobs,
                         expires_ns=self.clock() + req.ttl_s * NS)
        with self.engine.begin() as conn:
            conn.execute(db.capabilities.insert().values(id=cap.capability_id, user_hotkey=cap.user,
                                                         max_jobs=cap.max_jobs, expires_ns=cap.expires_ns,
                                                         jobs_used=0))
        return seal(self.hotkey, "capability", cap, clock=self.clock).to_token()

    def scope(self, cap: Capability, *, submission_id: str | None = None, job_id: str | None = None) -> str:
        """A driver's scope minted from the user capability ``cap``: for one Ray submission, or to
        follow one job of this user."""
        if cap.scope != "user":
            raise CapabilityRefused("scope_denied", "a driver's scope cannot mint scopes; use the user's capability",
                                    status_code=403)
        if (submission_id is None) == (job_id is None):
            raise ValueError("a scope is for one submission or one job")
        scoped = Capability(capability_id=uuid.uuid4().hex, user=cap.user, max_jobs=0 if job_id else cap.max_jobs,
                            expires_ns=cap.expires_ns, scope="job" if job_id else "submission",
                            parent_id=cap.capability_id, submission_id=submission_id, job_id=job_id)
        with self.engine.begin() as conn:
            if job_id is not None:
                job = conn.execute(sa.select(db.jobs.c.user_hotkey).where(db.jobs.c.id == job_id)).first()
                if job is None or job.user_hotkey != cap.user:
                    raise Refused("not_found", f"no job {job_id} for user {cap.user}", status_code=404)
            conn.execute(db.capabilities.insert().values(id=scoped.capability_id, user_hotkey=cap.user,
                                                         max_jobs=scoped.max_jobs, expires_ns=scoped.expires_ns,
                                                         jobs_used=0, parent_id=cap.capability_id))
        return seal(self.hotkey, "capability", scoped, clock=self.clock).to_token()

    def check(self, token: str | None, *, scopes: tuple[str, ...] = ("user",)) -> Capability:
        """The capability a request carries, if this validator signed it, it has not expired, and
        its scope is one of ``scopes`` (a driver's scope reaches only the jobs endpoints)."""
        if not token:
            raise CapabilityRefused("no_capability", "send a capability as `Authorization: Bearer <capability>`; "
                                    "get one with `rayhorde capability`", status_code=401)
        try:
            env = SignedEnvelope.from_token(token)
            cap = Capability.model_validate(open_envelope(env, kind="capability", max_skew_s=0,
                                                          signers=[self.hotkey.ss58], check_time=False))
        except SignatureRejected as exc:
            raise CapabilityRefused("invalid_capability", f"capability refused: {exc.message}",
                                    status_code=401) from exc
        now = self.clock()
        if now > cap.expires_ns:
            raise CapabilityRefused("capability_expired", f"capability expired {(now - cap.expires_ns) / NS:.0f} s "
                                    "ago; request a new one", status_code=401)
        if cap.scope not in scopes:
            raise CapabilityRefused("scope_denied", f"this token is a driver's scope ({cap.scope} "
                                    f"{cap.submission_id or cap.job_id}): it reaches only /v1/jobs; this needs the "
                                    "user's capability", status_code=403)
        return cap

    def budget(self, conn: sa.Connection, cap: Capability) -> sa.Row:
        """The capability's row, if it may still start a job (organic or streaming); the caller
        spends it with :meth:`spend` in the same transaction, once the job is sure to exist. A
        scope's parent must have budget left too."""
        if cap.scope == "job":
            raise CapabilityRefused("scope_denied", f"this token follows job {cap.job_id} only; it cannot start jobs",
                                    status_code=403)
        row = conn.execute(sa.select(db.capabilities).where(db.capabilities.c.id == cap.capability_id)).first()
        if row is None:
            raise CapabilityRefused("invalid_capability", "capability unknown to this validator", status_code=401)
        parent = row if row.parent_id is None else conn.execute(
            sa.select(db.capabilities).where(db.capabilities.c.id == row.parent_id)).one()
        for r in {row.id: row, parent.id: parent}.values():
            if r.jobs_used >= r.max_jobs:
                raise CapabilityRefused("over_budget", f"capability allows {r.max_jobs} jobs and all are used; "
                                        "request a new capability", status_code=403)
        return row

    @staticmethod
    def spend(conn: sa.Connection, row: sa.Row) -> None:
        """Count one more job against the capability ``row`` (from :meth:`budget`) and its parent."""
        ids = [row.id] if row.parent_id is None else [row.id, row.parent_id]
        conn.execute(db.capabilities.update().where(db.capabilities.c.id.in_(ids))
                     .values(jobs_used=db.capabilities.c.jobs_used + 1))


def sees(cap: Capability) -> sa.ColumnElement[bool]:
    """Which jobs ``cap`` may read, follow and cancel: its user's, its submission's, or its one job."""
    if cap.scope == "job":
        return db.jobs.c.id == cap.job_id
    if cap.scope == "submission":
        return db.jobs.c.capability_id == cap.capability_id
    return db.jobs.c.user_hotkey == cap.user
