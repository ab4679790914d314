"""validator-core's storage: SQLAlchemy Core over SQLite (default) or PostgreSQL, same code.

``open_engine(url)`` takes any SQLAlchemy URL: ``sqlite:///path/validator.db`` (the default,
WAL mode) or ``postgresql+psycopg://user@host:port/db`` (psycopg 3, ``pool_pre_ping``). Every
write happens in one transaction, so a crash leaves either the old or the new state. Signed
evidence (results, status reports) is stored verbatim as the envelope JSON.

Both backends behave the same for what the service relies on: ``JSON`` columns (PostgreSQL
``json``) round-trip dicts and lists; ``*_ns`` times are ``BigInteger`` (64-bit on both);
``Boolean`` is native on PostgreSQL and 0/1 on SQLite (compare with ``.is_(True)``);
autoincrement ``Integer`` keys (``SERIAL`` on PostgreSQL) give insertion order. Text columns
are :class:`String` / :class:`Text` below, which replace NUL characters with U+FFFD: PostgreSQL
refuses NUL in text and SQLite stores it, so a peer's string with a NUL would be a server error
on one backend only. (Envelope JSON escapes NUL as ``\\u0000``, so evidence is unaffected.)

Migrations. The database records its schema version in ``schema_version`` (one row per applied
step). :func:`migrate` (called by :func:`open_engine`) runs in ONE transaction, serialised
between processes (``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite):

- a fresh database runs step 1, ``create_all`` of the tables below, which already are the
  newest schema, and records every step as applied;
- a database holding these tables but no ``schema_version`` predates migrations: it is at 1;
- otherwise the steps after the recorded version run in order; a database newer than this code
  is refused (``ConfigError``). Running it again changes nothing (idempotent).

To change the schema later: (1) edit the ``Table`` below so it describes the NEW schema (that is
what a fresh database gets), and (2) append ``Migration(n + 1, "what changed", fn)`` to
:data:`MIGRATIONS`, where ``fn(conn)`` brings a database at version n to the new schema with
portable DDL, e.g. ``conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT
NULL DEFAULT 0"))`` or ``new_table.create(conn)``, plus any data backfill. Never edit or reorder
a released step; test the step on both backends (``tests/cluster/validator/test_store.py``).

Stored module paths. ``streams.serve_app`` is the Serve application entry sent to Serve's REST
API, and it names code by path: ``import_path`` (``module:attr``, the builder) and
``args.app`` (``module:Class``, the whitelisted app). They are the only columns that do. When a
module moves, add its old path to :data:`cluster.protocol.moved.MOVED_MODULES` and append a
step that runs :func:`_current_module_paths` again, so that stored entries name the new
modules before validator-core re-applies them to Serve.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable

import sqlalchemy as sa

from cluster.errors import ConfigError
from cluster.protocol.canonical import NS
from cluster.protocol.moved import current_module_path


class String(sa.types.TypeDecorator):
    """``VARCHAR`` that stores NUL as U+FFFD (PostgreSQL text cannot hold NUL; see module doc)."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


class Text(String):
    """``TEXT`` that stores NUL as U+FFFD."""

    impl = sa.Text
    cache_ok = True


metadata = sa.MetaData()

challenges = sa.Table(
    "challenges", metadata,
    sa.Column("nonce", String, primary_key=True),
    sa.Column("miner_hotkey", String, nullable=False),
    sa.Column("expires_ns", sa.BigInteger, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)
miners = sa.Table(
    "miners", metadata,
    sa.Column("hotkey", String, primary_key=True),
    sa.Column("admitted_ns", sa.BigInteger, nullable=False),
    sa.Column("executor_classes", sa.JSON, nullable=False),
    sa.Column("proxy_url", String, nullable=False, default=""),
    sa.Column("versions", sa.JSON, nullable=False),
    sa.Column("node_id", String, nullable=True),
    sa.Column("last_heartbeat_ns", sa.BigInteger, nullable=True),
    sa.Column("jobs_done", sa.Integer, nullable=False, default=0),
    sa.Column("peer_address", String, nullable=True),  # the address it joined from: the firewall admits it
)
seen_nonces = sa.Table(
    "seen_nonces", metadata,
    sa.Column("signer", String, primary_key=True),
    sa.Column("nonce", String, primary_key=True),
    sa.Column("t_ns", sa.BigInteger, nullable=False, index=True),
)
capabilities = sa.Table(
    "capabilities", metadata,
    sa.Column("id", String, primary_key=True),
    sa.Column("user_hotkey", String, nullable=False),
    sa.Column("max_jobs", sa.Integer, nullable=False),
    sa.Column("expires_ns", sa.BigInteger, nullable=False),
    sa.Column("jobs_used", sa.Integer, nullable=False, default=0),
    sa.Column("parent_id", String, nullable=True),  # a driver's scope: the user capability it spends
)
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", String, primary_key=True),
    sa.Column("capability_id", String, nullable=False),
    sa.Column("user_hotkey", String, nullable=False, index=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("executor_class", String, nullable=False),
    sa.Column("status", String, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.Column("miner_hotkey", String, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("max_wait_s", sa.Integer, nullable=False, default=300),
    sa.Column("queued_ns", sa.BigInteger, nullable=True),  # when it (re-)entered the queue
    sa.Column("current_ticket", String, nullable=True),
    sa.Column("failure", sa.JSON, nullable=True),
    sa.Column("result_envelope", Text, nullable=True),
)
tickets = sa.Table(
    "tickets", metadata,
    sa.Column("id", String, primary_key=True),
    sa.Column("job_id", String, nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("miner_hotkey", String, nullable=False, index=True),
    sa.Column("executor_class", String, nullable=False),
    sa.Column("issued_ns", sa.BigInteger, nullable=False),
    sa.Column("expires_ns", sa.BigInteger, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, default=True),  # holds an executor
    sa.Column("fetched_ns", sa.BigInteger, nullable=True),
    sa.Column("deadline_ns", sa.BigInteger, nullable=True),  # execution limit + leeway, from the fetch
    sa.Column("retired_reason", String, nullable=True),  # why this attempt was given up
    sa.Column("envelope", Text, nullable=False),
)
incidents = sa.Table(
    "incidents", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("miner_hotkey", String, nullable=False, index=True),
    sa.Column("t_ns", sa.BigInteger, nullable=False),
    sa.Column("kind", String, nullable=False),  # "fabric" (not charged) or "miner" (charged)
    sa.Column("reason", String, nullable=False),
    sa.Column("job_id", String, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=True),
    sa.Column("evidence", Text, nullable=True),
)
job_events = sa.Table(
    "job_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", String, nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status", String, nullable=False),
    sa.Column("t_ns", sa.BigInteger, nullable=False),
    sa.Column("reporter", String, nullable=False),
    sa.Column("detail", Text, nullable=False, default=""),
    sa.Column("evidence", Text, nullable=True),
)
streams = sa.Table(  # streaming jobs; their history lives in job_events under the same id
    "streams", metadata,
    sa.Column("id", String, primary_key=True),
    sa.Column("capability_id", String, nullable=False),
    sa.Column("user_hotkey", String, nullable=False, index=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("executor_class", String, nullable=False),
    sa.Column("status", String, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
    sa.Column("miner_hotkey", String, nullable=True, index=True),
    sa.Column("deadline_ns", sa.BigInteger, nullable=True),
    sa.Column("serve_app", sa.JSON, nullable=True),  # the application entry sent to Serve's REST API
    sa.Column("ready_envelope", Text, nullable=True),  # the miner-signed readiness, verbatim
    sa.Column("failure", sa.JSON, nullable=True),
    sa.Column("receipts_seq", sa.Integer, nullable=False, default=-1),  # last receipt collected (verification)
)
stream_claims = sa.Table(  # answers collected from miners' proxies, every signature checked
    "stream_claims", metadata,
    sa.Column("request_id", String, primary_key=True),
    sa.Column("job_id", String, nullable=False, index=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("miner_hotkey", String, nullable=False, index=True),
    sa.Column("collected_ns", sa.BigInteger, nullable=False),
    sa.Column("claim", Text, nullable=False),  # the Claim JSON, verbatim
    sa.Column("state", String, nullable=False, index=True),  # "unsampled", "pending", "verified", "failed"
    sa.Column("verdict", Text, nullable=True),  # the Verdict JSON
)

score_cycles = sa.Table(  # one row per closed scoring cycle: what was scored and what the chain was told
    "score_cycles", metadata,
    sa.Column("cycle", sa.BigInteger, primary_key=True, autoincrement=False),  # start_ns // cycle length
    sa.Column("start_ns", sa.BigInteger, nullable=False),
    sa.Column("end_ns", sa.BigInteger, nullable=False),
    sa.Column("closed_ns", sa.BigInteger, nullable=False),
    sa.Column("scores", sa.JSON, nullable=False),  # the CycleScores JSON
    sa.Column("weights", sa.JSON, nullable=False),  # {uid: u16} as sent
    sa.Column("chain_status", String, nullable=False),  # "set", "skipped: why", "failed: why"
    sa.Column("chain_ref", String, nullable=True),
)

probes = sa.Table(  # validator-core's own requests to verifiable streams: always verified
    "probes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", String, nullable=True, index=True),  # None: no verified answer came back
    sa.Column("job_id", String, nullable=False, index=True),
    sa.Column("miner_hotkey", String, nullable=False),
    sa.Column("sent_ns", sa.BigInteger, nullable=False),
    sa.Column("error", Text, nullable=True),
)


gateway_submissions = sa.Table(  # Ray Jobs submitted through validator-core's Jobs gateway, and whose they are
    "gateway_submissions", metadata,
    sa.Column("submission_id", String, primary_key=True),
    sa.Column("user_hotkey", String, nullable=False, index=True),
    sa.Column("capability_id", String, nullable=False),
    sa.Column("created_ns", sa.BigInteger, nullable=False),
)


def open_engine(url: str) -> sa.Engine:
    """An engine for ``url`` with the schema migrated to the newest version."""
    if sa.engine.make_url(url).get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                        break
                    except sqlite3.OperationalError as exc:
                        # The first connections to a new file race to switch it to WAL (stored in the
                        # file): SQLite answers one of them "locked" at once, without its busy timeout.
                        if "locked" not in str(exc) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.02)
                cur.execute("PRAGMA synchronous=NORMAL")
            finally:
                cur.close()
    else:
        # pre_ping: a connection the server closed (restart, idle timeout) is replaced, not used
        engine = sa.create_engine(url, pool_pre_ping=True)
    migrate(engine)
    return engine


# ---------------------------------------------------------------------------- migrations
schema_meta = sa.MetaData()  # kept apart so create_all of the application tables never touches it
schema_version = sa.Table(
    "schema_version", schema_meta,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", String, nullable=False),
    sa.Column("applied_ns", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _initial_tables(conn: sa.Connection) -> None:
    metadata.create_all(conn)  # checkfirst: creates only the missing tables and their indexes


def _claims_and_cursor(conn: sa.Connection) -> None:
    cols = {c["name"] for c in sa.inspect(conn).get_columns("streams")}
    if "receipts_seq" not in cols:  # step 2 of a database made before step 3 existed
        conn.execute(sa.text("ALTER TABLE streams ADD COLUMN receipts_seq INTEGER NOT NULL DEFAULT -1"))
    stream_claims.create(conn, checkfirst=True)


def _scores_and_probes(conn: sa.Connection) -> None:
    score_cycles.create(conn, checkfirst=True)
    probes.create(conn, checkfirst=True)


def _capability_scopes(conn: sa.Connection) -> None:
    if "parent_id" not in {c["name"] for c in sa.inspect(conn).get_columns("capabilities")}:
        conn.execute(sa.text("ALTER TABLE capabilities ADD COLUMN parent_id VARCHAR"))


def _miner_addresses(conn: sa.Connection) -> None:
    if "peer_address" not in {c["name"] for c in sa.inspect(conn).get_columns("miners")}:
        conn.execute(sa.text("ALTER TABLE miners ADD COLUMN peer_address VARCHAR"))


def _with_current_paths(app: dict[str, Any]) -> dict[str, Any]:
    """A stream's Serve application entry with the module paths it names made current."""
    out = dict(app)
    if isinstance(out.get("import_path"), str):
        out["import_path"] = current_module_path(out["import_path"])
    if isinstance(out.get("args"), dict) and isinstance(out["args"].get("app"), str):
        out["args"] = {**out["args"], "app": current_module_path(out["args"]["app"])}
    return out


def _current_module_paths(conn: sa.Connection) -> None:
    for row in conn.execute(sa.select(streams.c.id, streams.c.serve_app)).all():
        app = _with_current_paths(row.serve_app) if row.serve_app else row.serve_app
        if app != row.serve_app:
            conn.execute(streams.update().where(streams.c.id == row.id).values(serve_app=app))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial tables", _initial_tables),
    Migration(2, "streaming jobs", lambda conn: streams.create(conn, checkfirst=True)),
    Migration(3, "verification: collected claims, receipt cursor per stream", _claims_and_cursor),
    Migration(4, "scoring cycles, probes", _scores_and_probes),
    Migration(5, "stored module paths follow the modules that moved (cluster.protocol.moved)", _current_module_paths),
    Migration(6, "the Jobs gateway's submissions and their users",
              lambda conn: gateway_submissions.create(conn, checkfirst=True)),
    Migration(7, "drivers' scopes: capabilities minted from a user's, spending its budget", _capability_scopes),
    Migration(8, "the address each miner joined from (the admitted-only firewall)", _miner_addresses),
)
LATEST = MIGRATIONS[-1].version
_PG_LOCK_KEY = 0x7261_7968  # "rayh": one advisory lock id for rayhorde's schema migrations


def migrate(engine: sa.Engine) -> int:
    """Bring the schema to :data:`LATEST` in one transaction; return the version it was at before."""
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1)), "migration versions must be 1..n"
    backend = engine.dialect.name
    with engine.begin() as conn:
        if backend == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
        elif backend == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock now: one migrator at a time
        schema_meta.create_all(conn)
        before = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        if before is None:
            existing = set(sa.inspect(conn).get_table_names()) & set(metadata.tables)
            if not existing:  # fresh: step 1 builds the newest schema, so every step counts as applied
                MIGRATIONS[0].apply(conn)
                for step in MIGRATIONS:
                    _record(conn, step, "" if step.version == 1 else " (fresh database: built by step 1)")
                return 0
            before = 1  # tables from before migrations existed: they are step 1
            _record(conn, MIGRATIONS[0], " (tables predate schema_version)")
        if before > LATEST:
            raise ConfigError(f"the database schema is at version {before} but this rayhorde knows versions up to "
                              f"{LATEST}: run a newer rayhorde (downgrades are not supported)")
        for step in MIGRATIONS[before:]:
            step.apply(conn)
            _record(conn, step)
    return before


def _record(conn: sa.Connection, step: Migration, note: str = "") -> None:
    conn.execute(schema_version.insert().values(version=step.version, description=step.description + note,
                                                applied_ns=time.time_ns()))


# ---------------------------------------------------------------------------- replay guard
class DbNonceGuard:
    """Replay guard backed by ``seen_nonces``: a (signer, nonce) pair is accepted once.

    The duplicate insert raises ``IntegrityError`` inside the transaction and is caught OUTSIDE
    ``engine.begin()``, after the rollback: on PostgreSQL a failed statement aborts the whole
    transaction, so nothing may run in it afterwards; on both backends the pruning delete is
    rolled back with it (it runs again on the next accepted nonce). Two concurrent transactions
    with the same pair: PostgreSQL makes the second wait on the unique key and then fail; SQLite
    serialises writers. Either way exactly one is accepted.
    """

    def __init__(self, engine: sa.Engine, *, keep_s: float) -> None:
        self.engine = engine
        self.keep_ns = int(keep_s * NS)

    def check_and_record(self, signer: str, nonce: str, t_ns: int) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(seen_nonces.delete().where(seen_nonces.c.t_ns < t_ns - self.keep_ns))
                conn.execute(seen_nonces.insert().values(signer=signer, nonce=nonce, t_ns=t_ns))
        except sa.exc.IntegrityError:
            return False
        return True
