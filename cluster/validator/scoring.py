"""validator-core's scores and weights: what each miner's work was worth over a cycle.

A cycle is ``score_cycle_s`` long (default one subnet tempo, 360 blocks x 12 s) and aligned to
the Unix epoch, so cycle ``k`` is ``[k L, (k+1) L)`` whoever computes it. A miner's score for a
cycle is the executor-seconds it served there:

    organic     each job it completed with a signed result in the cycle: from the ticket's fetch
                to the result (the agent cannot stretch it: the deadline retires the attempt);
    streaming   each of its streams: the part of ``[streaming_ready, end)`` inside the cycle.
                A failed verification of the miner recorded in the cycle (one answer, a chain
                gap, or the batch statistic) makes ALL its streaming work of the cycle worth 0,
                not just the answer that failed; it is also banned from new work for
                ``verification_ban_s`` (placement, not here). So does a failed collection (a
                receipts page that broke the protocol or its budget: answers withheld from
                verification), without the ban.

Weights: scores of miners registered in the metagraph (and not in ``banned_hotkeys``),
max-normalised to u16 (the best miner gets 65535), sent with :meth:`ChainBackend.set_weights`
once per cycle when it ends. Every closed cycle is stored (``score_cycles``) with the scores,
the weights as sent and what the chain said, so a miner's weight can be explained later.
A cycle with no scored work sets nothing (the chain keeps the previous weights).
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from pydantic import BaseModel

from cluster.chain import U16_MAX, ChainBackend, ChainFeature, Metagraph
from cluster.errors import ChainError, ConfigError, ServiceUnavailable
from cluster.protocol.canonical import NS
from cluster.protocol.identity import Clock
from cluster.protocol.jobs import JobStatus
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.ledger import COLLECTION_FAILED, VERIFICATION_FAILED

log = logging.getLogger("rayhorde.scoring")
TERMINAL = tuple(s.value for s in JobStatus if s.terminal)


class MinerScore(BaseModel):
    hotkey: str
    uid: int | None = None  # None: not in the metagraph (deregistered): scored, but gets no weight
    organic_jobs: int = 0
    organic_executor_s: float = 0.0
    stream_executor_s: float = 0.0  # served; counts in ``score`` unless voided
    stream_answers: int = 0  # answers collected from its proxy in the cycle (every signature checked)
    verification_failures: int = 0
    collection_failures: int = 0
    stream_voided: bool = False  # a failed verification or collection in the cycle: streaming work worth nothing
    score: float = 0.0  # executor-seconds that count


class CycleScores(BaseModel):
    netuid: int
    cycle: int
    start_ns: int
    end_ns: int
    partial: bool = False  # the cycle has not ended yet (a running view)
    miners: list[MinerScore]
    weights: dict[int, int] = {}  # uid -> u16, as sent (or as would be sent)
    chain_status: str = ""
    chain_ref: str | None = None


def u16_weights(miners: list[MinerScore]) -> dict[int, int]:
    """uid -> u16, the best score at 65535 (bittensor's max-normalisation); zero scores left out."""
    scored = {m.uid: m.score for m in miners if m.uid is not None and m.score > 0}
    if not scored:
        return {}
    top = max(scored.values())
    return {uid: max(1, round(s / top * U16_MAX)) for uid, s in sorted(scored.items())}


def _overlap_s(a: int, b: int, start: int, end: int) -> float:
    return max(0, min(b, end) - max(a, start)) / NS


def score_window(conn: sa.Connection, start_ns: int, end_ns: int, now_ns: int) -> dict[str, MinerScore]:
    """Per-miner figures for ``[start_ns, end_ns)`` from what the database holds at ``now_ns``."""
    out: dict[str, MinerScore] = {}

    def miner(hotkey: str) -> MinerScore:
        return out.setdefault(hotkey, MinerScore(hotkey=hotkey))

    # organic: the completion event the miner reported, and the fetch of the attempt it finished
    done = conn.execute(
        sa.select(db.job_events.c.reporter, db.job_events.c.t_ns, db.tickets.c.fetched_ns)
        .select_from(db.job_events.join(db.tickets, sa.and_(db.tickets.c.job_id == db.job_events.c.job_id,
                                                             db.tickets.c.attempt == db.job_events.c.attempt,
                                                             db.tickets.c.miner_hotkey == db.job_events.c.reporter)))
        .where(db.job_events.c.status == JobStatus.completed.value, db.job_events.c.t_ns >= start_ns,
               db.job_events.c.t_ns < end_ns)).all()
    for reporter, t_ns, fetched_ns in done:
        m = miner(reporter)
        m.organic_jobs += 1
        m.organic_executor_s += max(0, t_ns - (fetched_ns or t_ns)) / NS

    # streaming: time between readiness and the end, clipped to the window
    for s in conn.execute(sa.select(db.streams.c.id, db.streams.c.miner_hotkey)
                          .where(db.streams.c.ready_envelope.is_not(None))).all():
        events = conn.execute(sa.select(db.job_events.c.status, db.job_events.c.t_ns)
                              .where(db.job_events.c.job_id == s.id).order_by(db.job_events.c.id)).all()
        ready = next((t for st, t in events if st == JobStatus.streaming_ready.value), None)
        ended = next((t for st, t in events if st in TERMINAL), now_ns)
        if ready is not None and ready < end_ns and ended > start_ns:
            miner(s.miner_hotkey).stream_executor_s += _overlap_s(ready, ended, start_ns, min(end_ns, now_ns))

    answers = conn.execute(sa.select(db.stream_claims.c.miner_hotkey, sa.func.count())
                           .where(db.stream_claims.c.collected_ns >= start_ns, db.stream_claims.c.collected_ns < end_ns,
                                  db.stream_claims.c.claim != "{}")
                           .group_by(db.stream_claims.c.miner_hotkey)).all()
    for hotkey, n in answers:
        miner(hotkey).stream_answers = n
    failures = conn.execute(sa.select(db.incidents.c.miner_hotkey, db.incidents.c.reason, sa.func.count())
                            .where(db.incidents.c.reason.in_((VERIFICATION_FAILED, COLLECTION_FAILED)),
                                   db.incidents.c.t_ns >= start_ns, db.incidents.c.t_ns < end_ns)
                            .group_by(db.incidents.c.miner_hotkey, db.incidents.c.reason)).all()
    for hotkey, reason, n in failures:
        m = miner(hotkey)
        m.stream_voided = True
        if reason == VERIFICATION_FAILED:
            m.verification_failures = n
        else:
            m.collection_failures = n

    for m in out.values():
        m.score = m.organic_executor_s + (0.0 if m.stream_voided else m.stream_executor_s)
    return out


class ScoringDesk:
    def __init__(self, settings: ValidatorSettings, *, engine: sa.Engine, chain: ChainBackend, clock: Clock) -> None:
        self.settings = settings
        self.engine = engine
        self.chain = chain
        self.clock = clock
        self.cycle_ns = int(self.settings.score_cycle_s * NS)

    def cycle_of(self, t_ns: int) -> int:
        return t_ns // self.cycle_ns

    def cycle_start(self, t_ns: int) -> int:
        """When the cycle holding ``t_ns`` began."""
        return self.cycle_of(t_ns) * self.cycle_ns

    def scores(self, cycle: int, *, now_ns: int | None = None) -> CycleScores:
        """The scores of ``cycle`` as the database has them now (a running view if it has not ended)."""
        now = self.clock() if now_ns is None else now_ns
        start, end = cycle * self.cycle_ns, (cycle + 1) * self.cycle_ns
        with self.engine.connect() as conn:
            by_miner = score_window(conn, start, end, now)
        mg = self._metagraph()
        banned = set(self.settings.banned_hotkeys)
        for m in by_miner.values():
            n = mg.neuron(m.hotkey) if mg is not None else None
            m.uid = n.uid if n is not None and m.hotkey not in banned else None
        miners = sorted(by_miner.values(), key=lambda m: (-m.score, m.hotkey))
        return CycleScores(netuid=self.settings.netuid, cycle=cycle, start_ns=start, end_ns=end, partial=now < end,
                           miners=miners, weights=u16_weights(miners))

    def _metagraph(self) -> Metagraph | None:
        try:
            return self.chain.metagraph(self.settings.netuid)
        except (ConfigError, ChainError, ServiceUnavailable) as exc:
            log.warning("metagraph unavailable, scores carry no uids: %s", exc)
            return None

    def closed(self, limit: int = 10) -> list[CycleScores]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(db.score_cycles).order_by(db.score_cycles.c.cycle.desc()).limit(limit)).all()
        return [CycleScores.model_validate(r.scores).model_copy(update={"chain_status": r.chain_status,
                                                                        "chain_ref": r.chain_ref}) for r in rows]

    def tick(self) -> CycleScores | None:
        """Close the last ended cycle if it is not closed yet: store its scores, set weights.
        Cycles missed while validator-core was down are not back-filled (the chain has moved on)."""
        cycle = self.cycle_of(self.clock()) - 1
        with self.engine.connect() as conn:
            if conn.execute(sa.select(db.score_cycles.c.cycle).where(db.score_cycles.c.cycle == cycle)).first():
                return None
        result = self.scores(cycle)
        weights = result.weights
        try:  # the row first: it claims the cycle, so weights are set once even with two processes
            with self.engine.begin() as conn:
                conn.execute(db.score_cycles.insert().values(
                    cycle=cycle, start_ns=result.start_ns, end_ns=result.end_ns, closed_ns=self.clock(),
                    scores=result.model_dump(mode="json"), weights={str(k): v for k, v in weights.items()},
                    chain_status="setting"))
        except sa.exc.IntegrityError:
            return None  # another validator-core process on the same database closed it first
        ref = None
        if not weights:
            status = "skipped: no registered miner did scored work in the cycle"
        elif ChainFeature.SET_WEIGHTS not in self.chain.features:
            status = f"skipped: the chain backend cannot set weights ({self.chain.features})"
        else:
            try:
                ref = self.chain.set_weights(self.settings.netuid, weights)
                status = "set"
            except (ChainError, ServiceUnavailable) as exc:
                status = f"failed: {exc}"  # recorded; the next cycle sets fresh weights
        with self.engine.begin() as conn:
            conn.execute(db.score_cycles.update().where(db.score_cycles.c.cycle == cycle)
                         .values(chain_status=status, chain_ref=ref))
        result = result.model_copy(update={"chain_status": status, "chain_ref": ref})
        log.info("cycle %d closed: %d miners scored, weights %s (%s)", cycle, len(result.miners), weights, status)
        return result
