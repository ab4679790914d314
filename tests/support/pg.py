"""A fresh database on the private PostgreSQL server (scripts/postgres.sh), dropped after."""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator

import sqlalchemy as sa


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "rayhorde_t") -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database; dropped after (FORCE: closes connections a
    test's engines left open)."""
    base = sa.engine.make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
