"""validator-core's verification loop: are miners serving the whitelisted model, exactly?

    collect   every ``verify_interval_s``: for each streaming job with a readiness, pull the
              receipts after the last one collected from the miner's proxy and check them
              (:mod:`cluster.verification.collector`); keep every claim; draw
              ``verify_fraction`` of them for the verifiers (an unpredictable draw: a miner
              cannot know which answers are checked) plus validator-core's own probes
              (:mod:`.probes`), always. A chain gap or a bad signature is a failed
              verification at once. ``collect_workers`` streams are pulled at once, each
              within its budget (``collect_budget_s``, ``collect_max_bytes``), so a hostile
              proxy delays no other stream past it; each page is stored before the next is
              asked. A page that breaks the protocol or its budget (not an object of typed
              receipts, more than asked, seq that does not advance, a request id seen before,
              too big, too slow) is a charged ``collection_failed`` incident: the pages kept
              before it stay, the stream is not pulled again for ``incident_penalty_s``, and
              its miner's streaming work of the scoring cycle is void (:mod:`.scoring`).
    batch     when ``verify_batch_min`` claims wait, or the oldest waited
              ``verify_batch_max_age_s``, hand up to ``verify_batch_max`` of them to the
              verification cluster (its autoscaler starts an 80 GB worker for the batch).
    verdicts  stored verbatim with their evidence; a failed one is a charged incident that bans
              the miner from new work for ``verification_ban_s`` and voids its streaming work
              of the scoring cycle (:mod:`.scoring`); a proof anyone can check can be exported
              (:mod:`cluster.verification.proof`).
    batch     after each batch, every miner's answers verified in the current scoring cycle go
    statistic through the batch statistic (:mod:`cluster.verification.calibration`):
              a copy of lower precision passes answer by answer but misses the model's exact
              choice more often than honest hardware; failing it is a failed verification too.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx
import sqlalchemy as sa

from cluster.errors import CollectionFailed, Refused
from cluster.protocol.canonical import NS
from cluster.protocol.client_envelope import RequestEnvelope
from cluster.protocol.envelope import SignedEnvelope
from cluster.protocol.http import tls_verify, untrusted_certificate
from cluster.protocol.identity import Clock, Hotkey
from cluster.protocol.jobs import JobStatus
from cluster.protocol.streams import StreamReady
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.ledger import COLLECTION_FAILED, VERIFICATION_FAILED, Ledger
from cluster.validator.scoring import ScoringDesk
from cluster.validator.streams import client_keys, route_prefix
from cluster.verification.calibration import BatchCalibration, batch_statistic
from cluster.verification.client import VerificationClient
from cluster.verification.collector import Budget, Collected, GapWatch, StreamSource, pull_pass
from cluster.verification.models import BatchVerdict, Claim, Verdict
from cluster.verification.proof import make_proof

log = logging.getLogger("rayhorde.verification")
BatchRunner = Callable[[list[Claim], float], list[Verdict]]
SCORABLE = ("/v1/chat/completions", "/v1/completions")


class VerificationDesk:
    def __init__(self, settings: ValidatorSettings, *, hotkey: Hotkey, engine: sa.Engine, ledger: Ledger,
                 scoring: ScoringDesk, clock: Clock, runner: BatchRunner | None = None) -> None:
        self.settings = settings
        self.hotkey = hotkey
        self.engine = engine
        self.ledger = ledger
        self.scoring = scoring  # a failed batch statistic is recorded once per scoring cycle
        self.clock = clock
        self.runner = runner  # None: collect and check chains only (no verification cluster)
        self._draw = secrets.SystemRandom()
        self._http = httpx.Client(timeout=30, verify=tls_verify(settings.ca_bundle_path))  # miners' proxies
        self._lock = threading.Lock()  # one collection / batch at a time
        self._store_lock = threading.Lock()  # a collection's pulls run in threads; their writes, one at a time
        self._gaps = GapWatch(settings.collect_gap_grace_s)  # holes kept late under load are not gaps

    # ------------------------------------------------------------------ collect
    def _sources(self) -> list[StreamSource]:
        now = self.clock()
        out = []
        with self.engine.connect() as conn:
            held_off = set(conn.execute(sa.select(db.incidents.c.job_id).where(  # failed lately: not again yet
                db.incidents.c.reason == COLLECTION_FAILED,
                db.incidents.c.t_ns >= now - int(self.settings.incident_penalty_s * NS))).scalars())
            for s in conn.execute(sa.select(db.streams).where(db.streams.c.ready_envelope.is_not(None))).all():
                if s.id in held_off:
                    continue
                if JobStatus(s.status).terminal:
                    ended = conn.execute(sa.select(sa.func.max(db.job_events.c.t_ns))
                                         .where(db.job_events.c.job_id == s.id)).scalar() or 0
                    if now - ended > self.settings.verify_drain_s * NS:
                        continue  # drained: its proxy has had time to hand everything over
                ready = StreamReady.model_validate(SignedEnvelope.model_validate_json(s.ready_envelope).payload)
                prev = None
                if s.receipts_seq >= 0:
                    raw = conn.execute(sa.select(db.stream_claims.c.claim).where(
                        db.stream_claims.c.job_id == s.id, db.stream_claims.c.seq == s.receipts_seq)).scalar()
                    prev = Claim.model_validate_json(raw).receipt.body if raw else None
                out.append(StreamSource(job_id=s.id, miner_hotkey=s.miner_hotkey, proxy_url=ready.proxy_url,
                                        job_key=ready.job_key, client_keys=client_keys(s),
                                        route_prefix=route_prefix(s.id), weights_sha256=ready.weights_sha256,
                                        after_seq=s.receipts_seq, prev=prev))
        return out

    def collect(self) -> int:
        """Pull and check what miners' proxies hold, ``collect_workers`` streams at once, each
        within its budget; returns how many answers were collected."""
        sources = self._sources()
        if not sources:
            return 0
        budget = Budget(seconds=self.settings.collect_budget_s, max_bytes=self.settings.collect_max_bytes,
                        limit=self.settings.collect_page_limit)
        n = 0
        with ThreadPoolExecutor(min(self.settings.collect_workers, len(sources)), "collect") as pool:
            for source, pulled in [(s, pool.submit(self._collect_one, s, budget)) for s in sources]:
                try:
                    n += pulled.result()
                except Exception:  # one stream's trouble must not cost the others their collection
                    log.exception("collecting the receipts of %s failed", source.job_id)
        return n

    def _collect_one(self, source: StreamSource, budget: Budget) -> int:
        """One pass over one stream (in a worker thread); each page is stored before the next."""
        n = 0

        def keep(page: Collected) -> None:
            nonlocal n
            self._store_collected(source.job_id, page)
            n += len(page.claims) + len(page.failures)

        try:
            pull_pass(source, self.hotkey, self._http, budget, keep, gaps=self._gaps)
        except CollectionFailed as exc:
            self._collection_failed(source, exc)
        except httpx.HTTPError as exc:  # refused, unreachable, an error status: not charged, nothing lost
            log.warning("could not pull receipts of %s from %s: %s", source.job_id, source.proxy_url,
                        untrusted_certificate(exc, source.proxy_url) or exc)
        return n

    def _collection_failed(self, source: StreamSource, exc: CollectionFailed) -> None:
        """A page that broke the protocol or its budget: a charged incident (see :mod:`.ledger`)."""
        evidence = json.dumps({"reason": exc.reason, "message": exc.message, "page": exc.page,
                               "proxy_url": source.proxy_url})
        with self._store_lock, self.engine.begin() as conn:
            self.ledger.incident(conn, source.miner_hotkey, COLLECTION_FAILED, charged=True, job_id=source.job_id,
                                 attempt=1, evidence=evidence)
        log.warning("collection failed for miner %s, job %s: %s", source.miner_hotkey, source.job_id, exc)

    def _store_collected(self, job_id: str, page: Collected) -> None:
        """One checked page, in one transaction; a request id stored already refuses the whole page."""
        claims, failures = page.claims, page.failures
        now = self.clock()
        with self._store_lock, self.engine.begin() as conn:
            held = sorted(conn.execute(sa.select(db.stream_claims.c.request_id).where(
                db.stream_claims.c.request_id.in_(page.request_ids))).scalars()) if page.request_ids else []
            if held:
                raise CollectionFailed("duplicate_request_id", f"page {page.page} repeats request id {held[0]}, "
                                       "collected before", page=page.page)
            probed = set(conn.execute(sa.select(db.probes.c.request_id).where(
                db.probes.c.request_id.in_([c.request_id for c in claims]))).scalars()) if claims else set()
            for c in claims:
                # only model answers can be re-scored (a model list, an echo answer: chain-checked only);
                # validator-core's own probes always are
                scorable = RequestEnvelope.model_validate_json(c.envelope).path.endswith(SCORABLE)
                drawn = c.request_id in probed or self._draw.random() < self.settings.verify_fraction
                state = "pending" if scorable and drawn else "unsampled"
                conn.execute(db.stream_claims.insert().values(
                    request_id=c.request_id, job_id=job_id, seq=c.receipt.body.seq, miner_hotkey=c.miner_hotkey,
                    collected_ns=now, claim=c.model_dump_json(), state=state))
            for v in failures:
                self._record_failure(conn, v, seq=-1)
            conn.execute(db.streams.update().where(db.streams.c.id == job_id).values(receipts_seq=page.last_seq))

    def _record_failure(self, conn: sa.Connection, v: Verdict, *, seq: int) -> None:
        """A failed verification: stored, and a charged incident (bans the miner for a while)."""
        exists = conn.execute(sa.select(db.stream_claims.c.request_id)
                              .where(db.stream_claims.c.request_id == v.request_id)).first()
        if exists:
            conn.execute(db.stream_claims.update().where(db.stream_claims.c.request_id == v.request_id)
                         .values(state="failed", verdict=v.model_dump_json()))
        else:  # nothing to score (a gap, a forged envelope): the verdict is the whole record
            conn.execute(db.stream_claims.insert().values(
                request_id=v.request_id, job_id=v.job_id, seq=seq, miner_hotkey=v.miner_hotkey,
                collected_ns=self.clock(), claim="{}", state="failed", verdict=v.model_dump_json()))
        self.ledger.incident(conn, v.miner_hotkey, VERIFICATION_FAILED, charged=True, job_id=v.job_id, attempt=1,
                             evidence=v.model_dump_json())
        log.warning("verification failed for miner %s, job %s: %s %s", v.miner_hotkey, v.job_id, v.reason, v.message)

    # ------------------------------------------------------------------ batches
    def batch_due(self) -> bool:
        with self.engine.connect() as conn:
            n, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(db.stream_claims.c.collected_ns))
                                     .where(db.stream_claims.c.state == "pending")).one()
        if not n:
            return False
        return n >= self.settings.verify_batch_min or \
            self.clock() - oldest > self.settings.verify_batch_max_age_s * NS

    def run_batch(self) -> list[Verdict]:
        """Verify up to ``verify_batch_max`` waiting claims on the verification cluster."""
        if self.runner is None:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.stream_claims.c.claim).where(db.stream_claims.c.state == "pending")
                                .order_by(db.stream_claims.c.collected_ns).limit(self.settings.verify_batch_max)).all()
        claims = [Claim.model_validate_json(r.claim) for r in rows]
        verdicts = self.runner(claims, self.settings.verify_margin)
        self.store_verdicts(verdicts)
        for miner in sorted({v.miner_hotkey for v in verdicts}):
            self.check_batch(miner)
        return verdicts

    def check_batch(self, miner: str) -> BatchVerdict | None:
        """The batch statistic over ``miner``'s answers verified in the current scoring cycle; a
        failure is recorded once per cycle. None: nothing verified yet."""
        start = self.scoring.cycle_start(self.clock())
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.stream_claims.c.verdict).where(
                db.stream_claims.c.miner_hotkey == miner, db.stream_claims.c.collected_ns >= start,
                db.stream_claims.c.state.in_(("verified", "failed")), db.stream_claims.c.verdict.is_not(None))).all()
        verdicts = [v for v in (Verdict.model_validate_json(r.verdict) for r in rows) if v.checked_tokens > 0]
        if not verdicts:
            return None
        cal = BatchCalibration(verifier="settings", honest_rate=self.settings.verify_batch_honest_rate,
                               z=self.settings.verify_batch_z)
        rate, threshold, ok = batch_statistic(verdicts, cal)
        bv = BatchVerdict(miner_hotkey=miner, ok=ok, request_ids=[v.request_id for v in verdicts],
                          positions=sum(v.checked_tokens for v in verdicts), mismatch_rate=rate, threshold=threshold,
                          honest_rate=cal.honest_rate, z=cal.z)
        if ok:
            return bv
        with self.engine.begin() as conn:
            already = conn.execute(sa.select(db.incidents.c.id).where(
                db.incidents.c.miner_hotkey == miner, db.incidents.c.reason == VERIFICATION_FAILED,
                db.incidents.c.job_id.is_(None), db.incidents.c.t_ns >= start)).first()
            if already is None:  # batch failures carry no job: one answer alone proves nothing
                self.ledger.incident(conn, miner, VERIFICATION_FAILED, charged=True, job_id=None, attempt=None,
                                     evidence=bv.model_dump_json())
                log.warning("batch statistic failed for miner %s: %s", miner, bv.message)
        return bv

    def store_verdicts(self, verdicts: list[Verdict]) -> None:
        with self.engine.begin() as conn:
            for v in verdicts:
                if v.ok:
                    conn.execute(db.stream_claims.update().where(db.stream_claims.c.request_id == v.request_id)
                                 .values(state="verified", verdict=v.model_dump_json()))
                else:
                    self._record_failure(conn, v, seq=-1)

    def tick(self) -> None:
        with self._lock:
            self.collect()
            if self.runner is not None and self.batch_due():
                self.run_batch()

    def start(self, stop: threading.Event) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(self.settings.verify_interval_s):
                try:
                    self.tick()
                except Exception:  # keep verifying; a transient failure must not stop collection
                    log.exception("verification tick failed")
        thread = threading.Thread(target=loop, name="verification", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ reading
    def verdict(self, request_id: str) -> tuple[Claim | None, Verdict | None, str | None]:
        """The claim, its verdict and the job's readiness envelope JSON (for proofs)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(db.stream_claims).where(db.stream_claims.c.request_id == request_id)).first()
            if row is None:
                return None, None, None
            ready = conn.execute(sa.select(db.streams.c.ready_envelope).where(db.streams.c.id == row.job_id)).scalar()
        claim = Claim.model_validate_json(row.claim) if row.claim != "{}" else None
        return claim, Verdict.model_validate_json(row.verdict) if row.verdict else None, ready

    def proof(self, request_id: str) -> bytes:
        """The exported proof of a verified (or failed) claim, signed by this validator."""
        claim, verdict, ready = self.verdict(request_id)
        if claim is None or verdict is None or ready is None:
            raise Refused("not_found", f"no verdict with a claim for request {request_id}", status_code=404)
        return make_proof(claim, SignedEnvelope.model_validate_json(ready), verdict, verdict.margin, self.hotkey)

    def summary(self) -> dict[str, dict[str, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.stream_claims.c.miner_hotkey, db.stream_claims.c.state, sa.func.count())
                                .group_by(db.stream_claims.c.miner_hotkey, db.stream_claims.c.state)).all()
        out: dict[str, dict[str, int]] = {}
        for miner, state, n in rows:
            out.setdefault(miner, {})[state] = n
        return out


def cluster_runner(address: str, token: str, work_dir: str, factory: str, keep_warm_s: float = 0) -> BatchRunner:
    """Batches go to the private verification cluster (its autoscaler adds a worker for them),
    through a driver subprocess: validator-core itself never joins a Ray cluster. The verifier
    actor stays warm ``keep_warm_s`` for the next batch (then exits; the worker idles out)."""
    def run(claims: list[Claim], margin: float) -> list[Verdict]:
        result = VerificationClient(address, token, work_dir=work_dir).run_batch(claims, margin, factory,
                                                                                 keep_warm_s=keep_warm_s)
        log.info("verified %d answers on %s in %s", len(claims), result.actor, result.timings)
        return result.verdicts
    return run

