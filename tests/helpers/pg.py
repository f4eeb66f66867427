"""The real PostgreSQL on 127.0.0.1:5432 for tests: each test gets its own fresh database.

``METERPROXY_TEST_PG`` names the server (an admin URL; default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth as in CI). When
it is unreachable the PostgreSQL tests skip with that reason, except under CI
(``CI`` set), where they fail: CI's ``.ci/run`` installs and starts it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

__all__ = ["PG_ADMIN", "fresh_database", "pg_or_skip", "pg_url_for", "store_on"]

PG_ADMIN = os.environ.get("METERPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _unreachable() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_ADMIN} unreachable: {str(exc).strip()}"
    return None


def pg_or_skip() -> None:
    why = _unreachable()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must provide it: see .ci/run)")
    pytest.skip(why)


def pg_url_for(name: str) -> str:
    base, _, _ = PG_ADMIN.rpartition("/")
    return f"{base}/{name}"


@contextmanager
def fresh_database() -> Iterator[str]:
    """``CREATE DATABASE meterproxy_test_<random>``; dropped (with any connections) afterwards."""
    name = f"meterproxy_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = pg_url_for(name)
    try:
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def store_on(engine: str, tmp_path: Path) -> Iterator[str]:
    """A new, empty store on ``engine`` ("sqlite": a file under ``tmp_path``; "postgresql": a fresh
    database, skipped or failed as `pg_or_skip` says when the server is unreachable)."""
    if engine == "sqlite":
        yield str(tmp_path / "m.db")
        return
    pg_or_skip()
    with fresh_database() as url:
        yield url
