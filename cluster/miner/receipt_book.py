"""The miner's book of kept answers: every receipt the proxy counter-signed, with both bodies, the
client's envelope and signature, on disk beside the agent until the validator pulled it.

An answer whose receipt is lost is a gap in its job's receipt chain, which validators count as a
failed verification: so receipts outlive the proxy's memory and the agent's process. A restarted
agent serves the pages of every job it kept answers for, routed now or not (the validator keeps
pulling an ended job's receipts for a while). One SQLite file (WAL), one row per answer.

What is kept goes when it has served its purpose: a validator that pulls a job's page after seq
``N`` has stored everything up to ``N`` (its cursor moves only after it stored them), so those rows
are deleted; rows nobody pulled go after ``keep_s``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kept (
    job_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kept_ns INTEGER NOT NULL,
    receipt TEXT NOT NULL,
    request BLOB NOT NULL,
    response BLOB NOT NULL,
    envelope BLOB NOT NULL,
    client_sig TEXT NOT NULL,
    PRIMARY KEY (job_id, request_id)
);
CREATE INDEX IF NOT EXISTS kept_by_seq ON kept (job_id, seq);
"""


class ReceiptBook:
    def __init__(self, path: Path | str, *, keep_s: float = 3 * 86400) -> None:
        """``path``: the SQLite file (``":memory:"`` keeps nothing across restarts: tests only)."""
        self.keep_ns = int(keep_s * 1e9)
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed row, a power cut may
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def keep(self, job_id: str, request_id: str, *, receipt: dict[str, Any], request: bytes, response: bytes,
             envelope: bytes, client_sig: str) -> None:
        now = time.time_ns()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO kept VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (job_id, request_id, int(receipt["body"]["seq"]), now, json.dumps(receipt), request,
                              response, envelope, client_sig))
            self._db.execute("DELETE FROM kept WHERE kept_ns < ?", (now - self.keep_ns,))

    def page(self, job_id: str, *, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` kept answers of ``job_id`` after ``after_seq``, in seq order; those up to
        ``after_seq`` are forgotten (the puller has them)."""
        with self._lock:
            self._db.execute("DELETE FROM kept WHERE job_id = ? AND seq <= ?", (job_id, after_seq))
            rows = self._db.execute(
                "SELECT receipt, request, response, envelope, client_sig FROM kept WHERE job_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (job_id, after_seq, limit)).fetchall()
        return [{"receipt": json.loads(r[0]), "request": r[1], "response": r[2], "envelope": r[3],
                 "client_sig": r[4]} for r in rows]

    def receipt(self, job_id: str, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT receipt FROM kept WHERE job_id = ? AND request_id = ?",
                                   (job_id, request_id)).fetchone()
        return None if row is None else json.loads(row[0])

    def jobs(self) -> set[str]:
        """The jobs with answers kept (a restarted agent serves their pages)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT job_id FROM kept")}

    def count(self, job_id: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM kept WHERE job_id = ?", (job_id,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
