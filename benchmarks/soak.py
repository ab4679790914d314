"""``python -m benchmarks.soak [--seconds 60] [--clients 64]``: a soak of the streaming path.

A local stack (validator-core, its Ray head, 2 miners x 2 executors), an ``echo`` streaming job
deployed through validator-core, and for ``--seconds`` seconds ``--clients`` concurrent clients
(threads, one ``httpx`` client each, made by ``StreamJob.http``: every request signed, every
answer's receipt verified: both signatures, both hashes, chain, clock) calling the job through
the miner's proxy, buffered and streamed (``?stream=1``) answers alternately. Organic jobs
(``sh -c 'echo hi'``, 2 at a time, a bounded total) run the whole time on the same miners.

Then it waits for validator-core's collector to pull every answer from the proxy and compares:
the request ids the clients got a verified receipt for against the claims validator-core stored
(its SQLite, table ``stream_claims``), plus every failed verification (``chain_gap``, ...) and
``collection_failed`` incident of the job. One ``BENCH`` line each:

* ``soak_errors``: non-200 answers, exceptions, answers whose receipt was missing or did not verify;
* ``soak_lost_receipts``: receipts clients got that validator-core never collected within
  2 x ``verify_interval_s`` + 30 s, + failed verifications + ``collection_failed`` incidents;
* ``soak_requests_per_s``: answers with a verified receipt per second of load;
* ``soak_proxy_mem_growth_mb``, ``soak_validator_mem_growth_mb``: PSS of the miner agent
  process that serves the proxy (the agent alone, not its Ray node) and of validator-core,
  after a warm-up of the same load vs after the load and its collection;
* ``soak_organic_jobs_completed``: organic jobs that completed during the load.

Like every benchmark it asserts nothing (exit status 0 once the figures are printed); when
errors or lost receipts show, ``#`` lines name the first of each kind, the job's failed claims
and the miner's incidents, and the stack's home (logs, validator-core's database, the miner's
receipt book) is kept and named.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import: keep the driver on loopback
os.environ["RAY_AUTH_MODE"] = "token"

import psutil  # noqa: E402
import ray  # noqa: E402

import jobs  # noqa: E402
from benchmarks.report import bench  # noqa: E402
from cluster.devstack.local_stack import DEV_MINER_URIS, LocalStack  # noqa: E402
from cluster.protocol.identity import Hotkey  # noqa: E402
from cluster.protocol.user import request_capability  # noqa: E402
from cluster.resources import config_path  # noqa: E402
from cluster.settings import ValidatorSettings, load_settings  # noqa: E402

IMAGE = "rayhorde/busybox:local"
TRIVIAL = ["sh", "-c", "echo hi"]
WARMUP_S = 5.0
ORGANIC_AT_ONCE, ORGANIC_MAX = 2, 1000  # organic jobs in flight, and in all
COLLECT_EXTRA_S = 30.0  # the wait for collection: 2 x verify_interval_s + this


def pss_mb(pid: int) -> float:
    """PSS of one process (not its children): the proxy lives in the agent, validator-core alone;
    NaN once it exited (a zombie's memory reads as 0)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return float("nan")
        return proc.memory_full_info().pss / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


class Load:
    """``clients`` threads calling the job until a deadline; counts, errors, receipts."""

    def __init__(self, job, key, clients: int) -> None:
        self.job, self.key, self.clients = job, key, clients
        self.lock = threading.Lock()
        self.requests = 0
        self.ok = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.first_error: dict[str, str] = {}
        self.receipts: set[str] = set()  # request ids of every answer whose receipt verified

    def run(self, seconds: float) -> float:
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(i, stop), name=f"soak-{i}") for i in range(self.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0

    def _error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.first_error.setdefault(kind, detail[:300])

    def _client(self, i: int, stop: float) -> None:
        n = 0
        with self.job.http(self.key, timeout_s=30) as http:
            while time.monotonic() < stop:
                streamed = (i + n) % 2 == 1
                body = json.dumps({"client": i, "n": n, "prompt": "x" * 200}).encode()
                n += 1
                with self.lock:
                    self.requests += 1
                try:
                    answer = self.job.call(self.key, "/echo?stream=1" if streamed else "/echo", body, client=http)
                except Exception as exc:  # ReceiptInvalid (missing, bad signature...), transport errors
                    self._error(f"{'stream' if streamed else 'buffered'}:{type(exc).__name__}", repr(exc))
                    continue
                if answer.status_code != 200:
                    self._error(f"{'stream' if streamed else 'buffered'}:http_{answer.status_code}",
                                answer.content.decode("utf-8", "replace"))
                    continue
                if answer.receipt is None:
                    self._error(f"{'stream' if streamed else 'buffered'}:no_receipt", answer.content[-200:].decode(
                        "utf-8", "replace"))
                    continue
                with self.lock:
                    self.ok += 1
                    self.receipts.add(answer.receipt.request_id)


def organic(state: dict, cap: str, stop: threading.Event, done: list[float], failed: list[str]) -> None:
    """Trivial organic jobs, ``ORGANIC_AT_ONCE`` at a time, until ``stop`` (or ``ORGANIC_MAX``)."""
    budget = iter(range(ORGANIC_MAX))

    def worker() -> None:
        while not stop.is_set() and next(budget, None) is not None:
            try:
                view = jobs.submit({"image": IMAGE, "command": TRIVIAL}, validator_url=state["validator_url"],
                                   capability=cap).result(timeout_s=120)
            except Exception as exc:
                failed.append(repr(exc)[:200])
                continue
            if view.status.value == "completed":
                done.append(time.monotonic())
            else:
                failed.append(f"{view.status.value}: {view.failure}"[:200])

    threads = [threading.Thread(target=worker, name=f"organic-{i}", daemon=True) for i in range(ORGANIC_AT_ONCE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def collected(db_path: Path, job_id: str) -> tuple[dict[str, tuple[str, str | None]], list[tuple[str, str]]]:
    """validator-core's stored claims of the job ({request id: (state, verdict reason)}) and the
    job's charged verification / collection incidents [(reason, evidence)]."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        claims = {}
        for rid, st, verdict in con.execute("SELECT request_id, state, verdict FROM stream_claims WHERE job_id = ?",
                                            (job_id,)):
            claims[rid] = (st, json.loads(verdict).get("reason") if verdict else None)
        incidents = con.execute("SELECT reason, evidence FROM incidents WHERE job_id = ? AND reason IN "
                                "('collection_failed', 'verification_failed')", (job_id,)).fetchall()
    finally:
        con.close()
    return claims, incidents


def miner_incidents(db_path: Path, miner_hotkey: str) -> list[tuple[str, str | None]]:
    """Every incident validator-core recorded against the miner serving the stream."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT reason, evidence FROM incidents WHERE miner_hotkey = ? ORDER BY id",
                           (miner_hotkey,)).fetchall()
    finally:
        con.close()


def book_count(miner_home: Path, job_id: str) -> int | None:
    """Answers the miner's receipt book still holds for the job (not yet pulled, or not yet deleted)."""
    path = miner_home / "receipts.db"
    if not path.exists():
        return None
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM kept WHERE job_id = ?", (job_id,)).fetchone()[0]
    except sqlite3.Error:
        return None
    finally:
        con.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("RAYHORDE_SOAK_SECONDS", 60)))
    parser.add_argument("--clients", type=int, default=int(os.environ.get("RAYHORDE_SOAK_CLIENTS", 64)))
    args = parser.parse_args()

    from serve_apps import SigningKey, StreamSpec, Streams

    try:
        verify_interval_s = load_settings(ValidatorSettings, config_path("validator.local.toml"),
                                          env_prefix="__unused__").verify_interval_s
    except Exception:  # the stack's own settings decide; this only sizes the wait
        verify_interval_s = ValidatorSettings.model_fields["verify_interval_s"].default
    t_start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="rh-soak-"))
    stack = LocalStack(home / "stack", miners=2, executors_per_miner=2)
    state = stack.up()
    stop_organic = threading.Event()
    organic_thread = None
    streams = job = None
    clean = False
    try:
        os.environ["RAY_AUTH_TOKEN"] = Path(state["token_path"]).read_text().strip()
        ray.init(address=state["gcs_address"], log_to_driver=False)
        cap = request_capability(state["validator_url"], Hotkey.from_uri("//Dave"), max_jobs=10_000, ttl_s=3600)
        streams = Streams(state["validator_url"], cap)
        key = SigningKey()
        job = streams.deploy(StreamSpec(app="echo", version="1", client_keys=[key.public]))
        job.wait_ready(timeout_s=120)
        names = {Hotkey.from_uri(uri).ss58: f"miner{i + 1}" for i, uri in enumerate(DEV_MINER_URIS)}
        miner = names[job.view.miner_hotkey]
        state = stack._state()
        agent_pid, validator_pid = state["pids"][miner], state["pids"]["validator"]
        miner_home = Path(state["miners"][miner]["home"])
        db_path = Path(state["home"]) / "validator" / "validator.db"

        done: list[float] = []
        failed: list[str] = []
        organic_thread = threading.Thread(target=organic, args=(state, cap, stop_organic, done, failed),
                                          name="organic", daemon=True)
        organic_thread.start()

        load = Load(job, key, args.clients)
        load.run(WARMUP_S)  # thread stacks, connection pools, Serve replica, the collector's first pages
        warm_errors = sum(load.errors.values())
        proxy0, validator0 = pss_mb(agent_pid), pss_mb(validator_pid)
        requests0, ok0, receipts0 = load.requests, load.ok, len(load.receipts)
        t_load = time.monotonic()
        elapsed = load.run(args.seconds)
        organic_in_load = sum(1 for t in done if t_load <= t <= t_load + elapsed)
        stop_organic.set()

        # the collector pulls every verify_interval_s: wait until it holds every receipt the clients got
        deadline = time.monotonic() + 2 * verify_interval_s + COLLECT_EXTRA_S
        t_wait = time.monotonic()
        while True:
            claims, incidents = collected(db_path, job.job_id)
            missing = load.receipts - set(claims)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1)
        waited = time.monotonic() - t_wait
        time.sleep(max(0.0, verify_interval_s + 1 - waited))  # one more pass: anything left to pull is seen
        claims, incidents = collected(db_path, job.job_id)
        missing = load.receipts - set(claims)
        proxy1, validator1 = pss_mb(agent_pid), pss_mb(validator_pid)
        view = job.refresh()
        if view.status.value != "streaming_ready":  # the job did not live through the soak: say why
            print(f"# soak: the stream is {view.status.value} after the load: "
                  f"{view.failure.message if view.failure else 'no failure recorded'}", flush=True)
        for reason, evidence in miner_incidents(db_path, job.view.miner_hotkey)[:8]:
            print(f"# soak incident of {miner}: {reason}: {(evidence or '')[:300]}", flush=True)
        failures = collections.Counter(reason for st, reason in claims.values() if st == "failed")
        coll_failed = [e for r, e in incidents if r == "collection_failed"]
        extra = set(claims) - load.receipts  # kept and collected, but the client got no receipt
        left_in_book = book_count(miner_home, job.job_id)

        errors = sum(load.errors.values())
        requests = load.requests - requests0
        bench("soak_errors", errors, "count",
              f"{requests} requests by {args.clients} clients in {elapsed:.1f} s (buffered and streamed); "
              + (", ".join(f"{k} x{v}" for k, v in load.errors.most_common()) or "none")
              + (f"; {warm_errors} in the {WARMUP_S:g} s warm-up" if warm_errors else ""))
        for kind, detail in load.first_error.items():
            print(f"# soak error {kind}: {detail}", flush=True)
        lost = len(missing) + sum(failures.values()) + len(coll_failed)
        bench("soak_lost_receipts", lost, "count",
              f"{len(load.receipts)} receipts clients got (warm-up included), {len(missing)} never collected "
              f"after {waited:.0f} s; failed verifications: {dict(failures) or 0}; collection_failed: "
              f"{len(coll_failed)}; {len(claims)} claims stored, {len(extra)} of answers no client got a "
              f"receipt for; {left_in_book if left_in_book is not None else '?'} rows left in the receipt book")
        for rid in sorted(missing)[:5]:
            print(f"# soak lost receipt: request {rid}", flush=True)
        for evidence in coll_failed[:3]:
            print(f"# soak collection_failed: {evidence[:400]}", flush=True)
        for rid, (_, reason) in [(r, c) for r, c in claims.items() if c[0] == "failed"][:5]:
            print(f"# soak failed claim {rid}: {reason}", flush=True)
        bench("soak_requests_per_s", (load.ok - ok0) / elapsed, "req/s",
              f"answers with a verified receipt per second, {args.clients} clients through {miner}'s proxy "
              f"while organic jobs ran")
        bench("soak_proxy_mem_growth_mb", proxy1 - proxy0, "MB",
              f"PSS of {miner}'s agent (the proxy's process) {proxy0:.0f} -> {proxy1:.0f} MB over "
              f"{len(load.receipts) - receipts0} answers"
              + ("; the agent exited during the soak" if math.isnan(proxy1) else ""))
        bench("soak_validator_mem_growth_mb", validator1 - validator0, "MB",
              f"PSS of validator-core {validator0:.0f} -> {validator1:.0f} MB, collecting them")
        bench("soak_organic_jobs_completed", organic_in_load, "count",
              f"trivial organic jobs, {ORGANIC_AT_ONCE} at a time, completed during the load; "
              f"{len(done)} in all, {len(failed)} failed" + (f" (first: {failed[0]})" if failed else ""))
        clean = errors == 0 and lost == 0
    finally:
        stop_organic.set()
        if job is not None:
            try:
                job.terminate()
            except Exception as exc:
                print(f"# soak: terminating the stream failed: {exc!r}", flush=True)
        if organic_thread is not None:
            organic_thread.join(timeout=150)
        if streams is not None:
            streams.close()
        if ray.is_initialized():
            ray.shutdown()
        stack.down()
        if clean:
            shutil.rmtree(home, ignore_errors=True)
        else:  # the logs and both databases, to find out why
            print(f"# soak: the stack's logs and databases are kept in {home}", flush=True)
    print(f"# soak: {time.monotonic() - t_start:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
