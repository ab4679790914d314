"""validator-core's storage on both backends: migrations, the replay guard, concurrent writers.

``db_url`` runs each test on SQLite and on PostgreSQL (the private server of
``scripts/postgres.sh``, started once per session; each test gets a fresh database, dropped
after). PostgreSQL is never skipped: if it cannot start, the test fails with the reason.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import sqlalchemy as sa

from cluster.validator import store as db
from cluster.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PG_SCRIPT = REPO / "scripts" / "postgres.sh"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The SQLAlchemy URL of the private PostgreSQL, started if it is not running."""
    try:
        start = subprocess.run([str(PG_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{PG_SCRIPT} start did not finish in {exc.timeout} s", pytrace=False)
    if start.returncode != 0:
        pytest.fail(f"PostgreSQL did not start: {PG_SCRIPT} start exited {start.returncode}\n"
                    f"{start.stdout}{start.stderr}", pytrace=False)
    return subprocess.run([str(PG_SCRIPT), "url"], capture_output=True, text=True, check=True).stdout.strip()


# PostgreSQL is a real server: `-m "not integration"` (make test-unit) runs the SQLite half only
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'validator.db'}"
        return
    base = sa.engine.make_url(request.getfixturevalue("postgres_server"))
    name = f"rayhorde_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # FORCE: closes connections a test's engines left open
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def open_db(db_url: str) -> Iterator[Callable[[], sa.Engine]]:
    """``open_db()`` -> a new engine on this test's database (disposed at the end)."""
    engines: list[sa.Engine] = []

    def make() -> sa.Engine:
        engines.append(db.open_engine(db_url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


def versions(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(db.schema_version.c.version).order_by(db.schema_version.c.version))
                    .scalars())


ALL = list(range(1, db.LATEST + 1))


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


# ---------------------------------------------------------------------------- migrations
def test_migrations_are_idempotent_and_keep_data(open_db):
    first = open_db()
    assert versions(first) == ALL == [1, 2, 3, 4]
    assert tables(first) == set(db.metadata.tables) | {"schema_version"}
    with first.begin() as conn:
        conn.execute(db.capabilities.insert().values(id="c1", user_hotkey="u", max_jobs=3, expires_ns=1, jobs_used=0))
    second = open_db()  # a restart: nothing to do, nothing lost
    assert db.migrate(second) == db.LATEST
    assert versions(second) == ALL
    with second.connect() as conn:
        assert conn.execute(sa.select(db.capabilities.c.max_jobs)).scalar_one() == 3


def test_database_from_before_migrations_is_version_1(db_url, open_db):
    legacy = sa.create_engine(db_url)
    db.metadata.create_all(legacy, tables=[t for t in db.metadata.sorted_tables if t.name not in (
        "streams", "stream_claims", "score_cycles", "probes")])  # what open_engine did before schema_version existed
    with legacy.begin() as conn:
        conn.execute(db.miners.insert().values(hotkey="m", admitted_ns=1, executor_classes={"a": 1}, versions={}))
    legacy.dispose()
    engine = open_db()
    assert versions(engine) == [1, 2, 3, 4]  # then 2, 3 and 4 ran
    assert {"streams", "stream_claims", "score_cycles", "probes"} <= tables(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(db.miners.c.executor_classes)).scalar_one() == {"a": 1}


def test_a_later_step_runs_once_on_old_databases_and_never_on_fresh_ones(db_url, open_db, monkeypatch):
    open_db()  # this database is at the latest version
    calls: list[str] = []
    n = db.LATEST + 1

    def add_priority(conn: sa.Connection) -> None:
        calls.append("run")
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0"))

    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS + (db.Migration(n, "jobs.priority", add_priority),))
    monkeypatch.setattr(db, "LATEST", n)
    engine = open_db()
    open_db()
    assert calls == ["run"] and versions(engine) == ALL + [n]
    assert "priority" in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}


def test_a_failing_step_rolls_back_everything(open_db, monkeypatch):
    open_db()

    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half_done (x INTEGER)"))
        raise RuntimeError("step failed half way")

    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS + (db.Migration(db.LATEST + 1, "broken", broken),))
    monkeypatch.setattr(db, "LATEST", db.LATEST + 1)
    with pytest.raises(RuntimeError, match="half way"):
        open_db()
    monkeypatch.undo()
    engine = open_db()
    assert versions(engine) == ALL and "half_done" not in tables(engine)  # the DDL was in the transaction


def test_a_newer_database_is_refused(open_db):
    engine = open_db()
    with engine.begin() as conn:
        conn.execute(db.schema_version.insert().values(version=99, description="future", applied_ns=1))
    with pytest.raises(ConfigError, match="schema is at version 99 .* knows versions up to 4"):
        open_db()


def test_concurrent_first_starts_migrate_once(db_url):
    barrier = threading.Barrier(4)
    engines: list[sa.Engine] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            engines.append(db.open_engine(db_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    try:
        assert errors == [] and len(engines) == 4
        assert versions(engines[0]) == ALL
    finally:
        [e.dispose() for e in engines]


# ---------------------------------------------------------------------------- replay guard
def test_nonce_guard_accepts_once_and_refuses_replays(open_db):
    guard = db.DbNonceGuard(open_db(), keep_s=60)
    t = time.time_ns()
    assert guard.check_and_record("alice", "n1", t) is True
    assert guard.check_and_record("alice", "n1", t) is False
    assert guard.check_and_record("alice", "n1", t + 10**9) is False  # a replay with a new time too
    assert guard.check_and_record("bob", "n1", t) is True  # nonces are per signer
    assert guard.check_and_record("alice", "n2", t) is True  # the guard still works after a refusal
    # nonces older than keep_s are pruned when a newer one is recorded
    assert guard.check_and_record("alice", "n3", t + 61 * 10**9) is True
    with guard.engine.connect() as conn:
        assert set(conn.execute(sa.select(db.seen_nonces.c.nonce)).scalars()) == {"n3"}


def test_nonce_guard_accepts_exactly_one_of_concurrent_replays(open_db):
    guard = db.DbNonceGuard(open_db(), keep_s=60)
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def replay(nonce: str) -> None:
        barrier.wait()
        results.append(guard.check_and_record("alice", nonce, time.time_ns()))

    for nonce in ("same", None):  # 8 threads with one nonce, then 8 with their own
        barrier.reset()
        results.clear()
        threads = [threading.Thread(target=replay, args=(nonce or f"own-{i}",)) for i in range(8)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert sorted(results) == ([False] * 7 + [True] if nonce else [True] * 8)


# ---------------------------------------------------------------------------- concurrent writers, types
def test_concurrent_inserts_and_increments_from_threads(open_db):
    engine = open_db()
    with engine.begin() as conn:
        conn.execute(db.miners.insert().values(hotkey="m", admitted_ns=1, executor_classes={}, versions={},
                                               jobs_done=0))

    def writer(w: int) -> None:
        for i in range(25):
            with engine.begin() as conn:
                conn.execute(db.job_events.insert().values(job_id=f"job-{w}", attempt=i, status="received",
                                                           t_ns=time.time_ns(), reporter="validator"))
                conn.execute(db.miners.update().where(db.miners.c.hotkey == "m")
                             .values(jobs_done=db.miners.c.jobs_done + 1))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(db.job_events.c.id, db.job_events.c.job_id, db.job_events.c.attempt)
                            .order_by(db.job_events.c.id)).all()
        assert conn.execute(sa.select(db.miners.c.jobs_done)).scalar_one() == 200
    assert len(rows) == 200 and len({r.id for r in rows}) == 200
    for w in range(8):  # each writer's rows keep its order in the autoincrement key
        assert [r.attempt for r in rows if r.job_id == f"job-{w}"] == list(range(25))


def test_column_types_round_trip_the_same(open_db):
    engine = open_db()
    spec = {"command": ["sh", "-c", "echo é"], "env": {"A": "1"}, "nested": {"list": [1, 2.5, None, True]}}
    ns = 9_000_000_000_000_000_000  # Unix ns fit BigInteger until 2255
    with engine.begin() as conn:
        conn.execute(db.jobs.insert().values(id="j", capability_id="c", user_hotkey="u", spec=spec,
                                             executor_class="x", status="received", created_ns=ns, attempt=0))
        for i, active in enumerate((True, False, True)):
            conn.execute(db.tickets.insert().values(id=f"t{i}", job_id="j", attempt=i, miner_hotkey="m",
                                                    executor_class="x", issued_ns=ns, expires_ns=ns,
                                                    active=active, envelope="{}"))
        conn.execute(db.job_events.insert().values(job_id="j", attempt=0, status="failed", t_ns=ns,
                                                   reporter="m", detail="bad\x00byte"))
    with engine.connect() as conn:
        job = conn.execute(sa.select(db.jobs)).one()
        assert job.spec == spec and job.created_ns == ns and job.failure is None
        assert conn.execute(sa.select(db.tickets.c.id).where(db.tickets.c.active.is_(True))
                            .order_by(db.tickets.c.id)).scalars().all() == ["t0", "t2"]
        assert conn.execute(sa.select(db.tickets.c.active).where(db.tickets.c.id == "t1")).scalar_one() is False
        # PostgreSQL refuses NUL in text; both backends store U+FFFD instead
        assert conn.execute(sa.select(db.job_events.c.detail)).scalar_one() == "bad\ufffdbyte"


def test_steps_3_and_4_bring_a_version_2_database_up(open_db):
    engine = open_db()
    with engine.begin() as conn:  # make it what step 2 left: streams without the cursor, no claims/scores tables
        conn.execute(sa.text("ALTER TABLE streams DROP COLUMN receipts_seq"))
        conn.execute(sa.text("DROP TABLE stream_claims"))
        conn.execute(sa.text("DROP TABLE score_cycles"))
        conn.execute(sa.text("DROP TABLE probes"))
        conn.execute(db.schema_version.delete().where(db.schema_version.c.version >= 3))
        conn.execute(sa.text("INSERT INTO streams (id, capability_id, user_hotkey, spec, executor_class, status, "
                             "created_ns) VALUES ('s1', 'c', 'u', '{}', 'x', 'accepted', 1)"))
    engine = open_db()
    assert versions(engine) == ALL
    with engine.connect() as conn:
        assert conn.execute(sa.select(db.streams.c.receipts_seq)).scalar_one() == -1  # the old row got the default
    assert {"stream_claims", "score_cycles", "probes"} <= tables(engine)  # steps 3 and 4 ran
