"""Shared fixtures: real servers, not mocks.

``postgres_url`` is a throwaway PostgreSQL cluster (see tests/support/postgres.py), started
once per session and only when some test asks for it. Missing PostgreSQL is a failure, not a
skip: DESIGN.md promises the store is tested on a real server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from overflowd.store import Store
from tests.support.postgres import PostgresServer, PostgresUnavailable

SESSION_DATABASE = "overflowd_test"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL cluster; stopped and deleted at the end, whatever happened."""
    server = None
    try:
        server = PostgresServer()
        server.start()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL is required for these tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of a database created with ``createdb``, shared by the whole session."""
    postgres_server.createdb(SESSION_DATABASE)
    return postgres_server.url(SESSION_DATABASE)


@pytest.fixture
def postgres_db_url(postgres_server: PostgresServer, postgres_url: str) -> Iterator[str]:
    """SQLAlchemy URL of an empty database for this test alone, dropped afterwards.

    It is a fresh schema in the session's database, made the URL's whole ``search_path``: as
    good as a new database to code that does not name schemas, and a thousand times faster to
    make than CREATE DATABASE.
    """
    with postgres_server.schema(SESSION_DATABASE) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL on each backend: SQLite in a directory that does not exist yet (open()
    creates it), and a schema of its own on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'home' / 'overflowd.db'}"
    url: str = request.getfixturevalue("postgres_db_url")
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as s:
        yield s
