"""validator-core's storage: SQLAlchemy Core over SQLite by default (any SQLAlchemy URL).

Every write happens in one transaction, so a crash leaves either the old or the new state.
Signed evidence (results, status reports) is stored verbatim as the envelope JSON.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()

challenges = sa.Table(
    "challenges", metadata,
    sa.Column("nonce", sa.String, primary_key=True),
    sa.Column("miner_hotkey", sa.String, nullable=False),
    sa.Column("expires_ns", sa.BigInteger, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)
miners = sa.Table(
    "miners", metadata,
    sa.Column("hotkey", sa.String, primary_key=True),
    sa.Column("admitted_ns", sa.BigInteger, nullable=False),
    sa.Column("executor_classes", sa.JSON, nullable=False),
    sa.Column("proxy_url", sa.String, nullable=False, default=""),
    sa.Column("versions", sa.JSON, nullable=False),
    sa.Column("node_id", sa.String, nullable=True),
    sa.Column("last_heartbeat_ns", sa.BigInteger, nullable=True),
    sa.Column("jobs_done", sa.Integer, nullable=False, default=0),
)
seen_nonces = sa.Table(
    "seen_nonces", metadata,
    sa.Column("signer", sa.String, primary_key=True),
    sa.Column("nonce", sa.String, primary_key=True),
    sa.Column("t_ns", sa.BigInteger, nullable=False, index=True),
)
capabilities = sa.Table(
    "capabilities", metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("user_hotkey", sa.String, nullable=False),
    sa.Column("max_jobs", sa.Integer, nullable=False),
    sa.Column("expires_ns", sa.BigInteger, nullable=False),
    sa.Column("jobs_used", sa.Integer, nullable=False, default=0),
)
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("capability_id", sa.String, nullable=False),
    sa.Column("user_hotkey", sa.String, nullable=False, index=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("executor_class", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.Column("miner_hotkey", sa.String, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("max_wait_s", sa.Integer, nullable=False, default=300),
    sa.Column("current_ticket", sa.String, nullable=True),
    sa.Column("failure", sa.JSON, nullable=True),
    sa.Column("result_envelope", sa.Text, nullable=True),
)
tickets = sa.Table(
    "tickets", metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("job_id", sa.String, nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("miner_hotkey", sa.String, nullable=False, index=True),
    sa.Column("executor_class", sa.String, nullable=False),
    sa.Column("issued_ns", sa.BigInteger, nullable=False),
    sa.Column("expires_ns", sa.BigInteger, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, default=True),  # holds an executor
    sa.Column("fetched_ns", sa.BigInteger, nullable=True),
    sa.Column("deadline_ns", sa.BigInteger, nullable=True),  # execution limit + leeway, from the fetch
    sa.Column("retired_reason", sa.String, nullable=True),  # why this attempt was given up
    sa.Column("envelope", sa.Text, nullable=False),
)
incidents = sa.Table(
    "incidents", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("miner_hotkey", sa.String, nullable=False, index=True),
    sa.Column("t_ns", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String, nullable=False),  # "fabric" (not charged) or "miner" (charged)
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("job_id", sa.String, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=True),
    sa.Column("evidence", sa.Text, nullable=True),
)
job_events = sa.Table(
    "job_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String, nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("t_ns", sa.BigInteger, nullable=False),
    sa.Column("reporter", sa.String, nullable=False),
    sa.Column("detail", sa.Text, nullable=False, default=""),
    sa.Column("evidence", sa.Text, nullable=True),
)


def open_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    return engine


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


class DbNonceGuard:
    """Replay guard backed by ``seen_nonces``: a (signer, nonce) pair is accepted once."""

    def __init__(self, engine: sa.Engine, *, keep_s: float) -> None:
        self.engine = engine
        self.keep_ns = int(keep_s * 1e9)

    def check_and_record(self, signer: str, nonce: str, t_ns: int) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(seen_nonces.delete().where(seen_nonces.c.t_ns < t_ns - self.keep_ns))
                conn.execute(seen_nonces.insert().values(signer=signer, nonce=nonce, t_ns=t_ns))
        except sa.exc.IntegrityError:
            return False
        return True
