"""validator-core's storage on both backends: migrations, the replay guard, concurrent writers.

``db_url`` runs each test on SQLite and on PostgreSQL (the private server of
``scripts/postgres.sh``, started once per session; each test gets a fresh database, dropped
after). PostgreSQL is never skipped: if it cannot start, the test fails with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa

from cluster.chain.local import LocalChain
from cluster.errors import ConfigError
from cluster.protocol.identity import Hotkey
from cluster.protocol.moved import MOVED_MODULES, current_module_path
from cluster.settings import ValidatorSettings
from cluster.validator import store as db
from cluster.validator.core import ValidatorCore

REPO = Path(__file__).resolve().parents[3]


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
    assert versions(first) == ALL == [1, 2, 3, 4, 5, 6, 7, 8]
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
        "streams", "stream_claims", "score_cycles", "probes", "gateway_submissions")])  # before schema_version
    with legacy.begin() as conn:
        conn.execute(db.miners.insert().values(hotkey="m", admitted_ns=1, executor_classes={"a": 1}, versions={}))
    legacy.dispose()
    engine = open_db()
    assert versions(engine) == [1, 2, 3, 4, 5, 6, 7, 8]  # then 2 to 8 ran
    assert {"streams", "stream_claims", "score_cycles", "probes", "gateway_submissions"} <= tables(engine)
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
    with pytest.raises(ConfigError, match="schema is at version 99 .* knows versions up to 8"):
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


# ---------------------------------------------------------------------------- stored module paths
def _v4_tables() -> sa.MetaData:
    """The schema at version 4, as the previous layout (``cluster._private``) created it: written out
    here, apart from :mod:`cluster.validator.store`, so the test really starts from the old shape."""
    m = sa.MetaData()
    col, S, T, B, I, J = sa.Column, sa.String, sa.Text, sa.BigInteger, sa.Integer, sa.JSON
    sa.Table("challenges", m, col("nonce", S, primary_key=True), col("miner_hotkey", S, nullable=False),
             col("expires_ns", B, nullable=False), col("used", sa.Boolean, nullable=False))
    sa.Table("miners", m, col("hotkey", S, primary_key=True), col("admitted_ns", B, nullable=False),
             col("executor_classes", J, nullable=False), col("proxy_url", S, nullable=False),
             col("versions", J, nullable=False), col("node_id", S), col("last_heartbeat_ns", B),
             col("jobs_done", I, nullable=False))
    sa.Table("seen_nonces", m, col("signer", S, primary_key=True), col("nonce", S, primary_key=True),
             col("t_ns", B, nullable=False, index=True))
    sa.Table("capabilities", m, col("id", S, primary_key=True), col("user_hotkey", S, nullable=False),
             col("max_jobs", I, nullable=False), col("expires_ns", B, nullable=False),
             col("jobs_used", I, nullable=False))
    sa.Table("jobs", m, col("id", S, primary_key=True), col("capability_id", S, nullable=False),
             col("user_hotkey", S, nullable=False, index=True), col("spec", J, nullable=False),
             col("executor_class", S, nullable=False), col("status", S, nullable=False),
             col("created_ns", B, nullable=False), col("miner_hotkey", S), col("attempt", I, nullable=False),
             col("max_wait_s", I, nullable=False), col("queued_ns", B), col("current_ticket", S),
             col("failure", J), col("result_envelope", T))
    sa.Table("tickets", m, col("id", S, primary_key=True), col("job_id", S, nullable=False, index=True),
             col("attempt", I, nullable=False), col("miner_hotkey", S, nullable=False, index=True),
             col("executor_class", S, nullable=False), col("issued_ns", B, nullable=False),
             col("expires_ns", B, nullable=False), col("active", sa.Boolean, nullable=False), col("fetched_ns", B),
             col("deadline_ns", B), col("retired_reason", S), col("envelope", T, nullable=False))
    sa.Table("incidents", m, col("id", I, primary_key=True, autoincrement=True),
             col("miner_hotkey", S, nullable=False, index=True), col("t_ns", B, nullable=False),
             col("kind", S, nullable=False), col("reason", S, nullable=False), col("job_id", S), col("attempt", I),
             col("evidence", T))
    sa.Table("job_events", m, col("id", I, primary_key=True, autoincrement=True),
             col("job_id", S, nullable=False, index=True), col("attempt", I, nullable=False),
             col("status", S, nullable=False), col("t_ns", B, nullable=False), col("reporter", S, nullable=False),
             col("detail", T, nullable=False), col("evidence", T))
    sa.Table("streams", m, col("id", S, primary_key=True), col("capability_id", S, nullable=False),
             col("user_hotkey", S, nullable=False, index=True), col("spec", J, nullable=False),
             col("executor_class", S, nullable=False), col("status", S, nullable=False),
             col("created_ns", B, nullable=False), col("miner_hotkey", S, index=True), col("deadline_ns", B),
             col("serve_app", J), col("ready_envelope", T), col("failure", J),
             col("receipts_seq", I, nullable=False))
    sa.Table("stream_claims", m, col("request_id", S, primary_key=True), col("job_id", S, nullable=False, index=True),
             col("seq", I, nullable=False), col("miner_hotkey", S, nullable=False, index=True),
             col("collected_ns", B, nullable=False), col("claim", T, nullable=False),
             col("state", S, nullable=False, index=True), col("verdict", T))
    sa.Table("score_cycles", m, col("cycle", B, primary_key=True, autoincrement=False),
             col("start_ns", B, nullable=False), col("end_ns", B, nullable=False), col("closed_ns", B, nullable=False),
             col("scores", J, nullable=False), col("weights", J, nullable=False),
             col("chain_status", S, nullable=False), col("chain_ref", S))
    sa.Table("probes", m, col("id", I, primary_key=True, autoincrement=True), col("request_id", S, index=True),
             col("job_id", S, nullable=False, index=True), col("miner_hotkey", S, nullable=False),
             col("sent_ns", B, nullable=False), col("error", T))
    sa.Table("schema_version", m, col("version", I, primary_key=True, autoincrement=False),
             col("description", S, nullable=False), col("applied_ns", B, nullable=False))
    return m


def _old_serve_app(job_id: str, app: str) -> dict[str, Any]:
    """A stream's Serve application entry as the previous layout's validator-core wrote it."""
    return {"name": job_id, "route_prefix": f"/jobs/{job_id}", "import_path": "serve_apps._private.builder:build",
            "args": {"app": app, "name": "echo", "pin_resource": "miner:m", "num_cpus": 0, "memory_mb": None,
                     "env": {}, "max_ongoing_requests": 64,
                     "init": {"job_id": job_id, "miner_hotkey": "m", "client_keys": [],
                              "route_prefix": f"/jobs/{job_id}", "max_skew_s": 5.0}}}


class _FakeServeRest(BaseHTTPRequestHandler):
    """Serve's REST API on the head's dashboard port: records each config PUT, deploys nothing."""

    puts: list[dict[str, Any]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer({"applications": {}})

    def do_PUT(self) -> None:  # noqa: N802
        self.puts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self._answer({})

    def _answer(self, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_a_database_of_the_previous_layout_opens_and_its_streams_name_current_modules(db_url, tmp_path):
    old = sa.create_engine(db_url)
    tables = _v4_tables()
    tables.create_all(old)
    t = tables.tables
    with old.begin() as conn:
        conn.execute(t["schema_version"].insert(), [
            {"version": 1, "description": "initial tables", "applied_ns": 1},
            {"version": 2, "description": "streaming jobs (fresh database: built by step 1)", "applied_ns": 1},
            {"version": 3, "description": "verification: collected claims, receipt cursor per stream (fresh "
                                          "database: built by step 1)", "applied_ns": 1},
            {"version": 4, "description": "scoring cycles, probes (fresh database: built by step 1)", "applied_ns": 1}])
        row = {"capability_id": "c", "user_hotkey": "u", "spec": {"app": "echo", "version": "1"},
               "executor_class": "always_on.test", "created_ns": 1, "miner_hotkey": "m", "deadline_ns": 2**62,
               "ready_envelope": None, "failure": None, "receipts_seq": -1}
        conn.execute(t["streams"].insert(), [
            # serving now: validator-core re-applies it to Serve after the upgrade
            {**row, "id": "s-live", "status": "accepted",
             "serve_app": _old_serve_app("s-live", "serve_apps.echo:EchoApp")},
            # ended, with an app kept under a package that moved: records name current modules too
            {**row, "id": "s-ended", "status": "completed",
             "serve_app": _old_serve_app("s-ended", "serve_apps._private.llm.engine:InferenceEngine")}])
    old.dispose()

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServeRest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FakeServeRest.puts = []
    repo = Path(__file__).resolve().parents[3]
    settings = ValidatorSettings(home=tmp_path, wallet_path=tmp_path, db_url=db_url, deploy_streams=True,
                                 ray_port_base=server.server_address[1] - 1,  # the dashboard is base + 1
                                 metagraph_path=repo / "configs" / "metagraph.local.json",
                                 executor_classes_path=repo / "configs" / "executor_classes.toml",
                                 whitelist_path=repo / "configs" / "serve_apps.toml")
    core = ValidatorCore(settings, hotkey=Hotkey.from_uri("//Alice"), chain=LocalChain(settings.metagraph_path),
                         ray_token="token")
    try:
        assert versions(core.engine) == ALL  # step 5 ran on the old database
        with core.engine.connect() as conn:
            apps = dict(conn.execute(sa.select(db.streams.c.id, db.streams.c.serve_app)).all())
        assert {a["import_path"] for a in apps.values()} == {"serve_apps.builder:build"}
        assert apps["s-live"]["args"]["app"] == "serve_apps.echo:EchoApp"  # a path that did not move stays
        assert apps["s-ended"]["args"]["app"] == "serve_apps.inference.engine:InferenceEngine"
        assert apps["s-live"] == {**_old_serve_app("s-live", "serve_apps.echo:EchoApp"),
                                  "import_path": "serve_apps.builder:build"}  # nothing else changed
        for app in apps.values():
            assert callable(_resolve(app["import_path"])) and isinstance(_resolve(app["args"]["app"]), type)

        core.streams.reconcile()  # what validator-core PUTs to Serve's REST API: the live stream, new paths
        [config] = _FakeServeRest.puts
        assert config["applications"] == [apps["s-live"]]
    finally:
        core.engine.dispose()
        server.shutdown()
        server.server_close()


def test_moved_module_paths_resolve_to_modules_that_exist():
    assert current_module_path("serve_apps._private.builder:build") == "serve_apps.builder:build"
    assert current_module_path("serve_apps._private.llm.engine:X") == "serve_apps.inference.engine:X"
    factory = current_module_path("cluster._private.verification.verifier:Verifier")  # an old verifier_factory
    assert factory == "cluster.verification.verifier:Verifier" and isinstance(_resolve(factory), type)
    for path in ("serve_apps.builder:build", "serve_apps.echo:EchoApp", "cluster.verification.verifier:Verifier",
                 "my_company.apps:App"):
        assert current_module_path(path) == path  # current (or foreign) paths are left alone
    for old, new in MOVED_MODULES.items():
        assert old.endswith(".") == new.endswith("."), (old, new)  # a package maps to a package
        target = new.rstrip(".")
        assert importlib.util.find_spec(target) is not None, f"{old} moved to {target}, which does not exist"
        assert current_module_path(current_module_path(old.rstrip("."))) == current_module_path(old.rstrip("."))

