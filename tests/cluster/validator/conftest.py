"""The validator's storage fixtures: every storage test runs on SQLite and on PostgreSQL.

``db_url`` gives a fresh, empty database on each backend (PostgreSQL: the private server of
``scripts/postgres.sh``, started once per session, a new database per test, dropped after).
PostgreSQL is never skipped: if it cannot start, the test fails with the reason.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.pg import fresh_database

PG_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "postgres.sh"


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
    with fresh_database(request.getfixturevalue("postgres_server")) as url:
        yield url
