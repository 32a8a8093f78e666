"""Shared fixtures: real servers, not mocks.

``postgres_url`` is a throwaway PostgreSQL cluster (see tests/support/postgres.py), started
once per session and only when some test asks for it. Missing PostgreSQL is a failure, not a
skip: DESIGN.md promises the store is tested on a real server.

Hypothesis profiles (chosen here, before any test module builds its ``settings``):

* ``ci`` — loaded when ``CI=true`` (CI sets it; ``make test`` under CI): derandomized, so a
  run from a fresh clone tries exactly the examples the last one did and a red CI is a real
  regression, never a lucky draw; no example database; no deadline and no ``too_slow``
  health check, since both measure wall time and 8 jobs share 2 cores; failures print their
  ``@reproduce_failure`` blob.
* ``dev`` — the default: random seeds, the local example database, so a developer's runs
  keep exploring and replay what failed before.
* ``fuzz`` — ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``): random seeds and every test's own
  ``max_examples`` multiplied by ``FUZZ_EXAMPLES_FACTOR`` (default 10). A failure found this
  way is added to the test as an ``@example`` so that CI replays it for ever.

``HYPOTHESIS_PROFILE`` names a profile explicitly and wins over ``CI``.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Verbosity, settings

from overflowd.store import Store
from tests.support.postgres import PostgresServer, PostgresUnavailable
from tests.support.stores import sqlite_at_head

SESSION_DATABASE = "overflowd_test"

# -- hypothesis profiles -------------------------------------------------------------------------

#: health checks that measure wall time: on a loaded machine they fail a correct test
_TIMING_HEALTH_CHECKS = [HealthCheck.too_slow]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_TIMING_HEALTH_CHECKS,
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile(
    "fuzz",
    derandomize=False,
    deadline=None,
    print_blob=True,
    suppress_health_check=_TIMING_HEALTH_CHECKS,
    verbosity=Verbosity.normal,
)


def _hypothesis_profile() -> str:
    explicit = os.environ.get("HYPOTHESIS_PROFILE", "").strip()
    if explicit:
        return explicit
    return "ci" if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes") else "dev"


HYPOTHESIS_PROFILE = _hypothesis_profile()
settings.load_profile(HYPOTHESIS_PROFILE)
#: under the fuzz profile, each test runs this many times its own max_examples
FUZZ_EXAMPLES_FACTOR = int(os.environ.get("FUZZ_EXAMPLES_FACTOR", "10"))


@pytest.fixture(autouse=True)
def _deterministic_trio_scheduling(request: pytest.FixtureRequest) -> None:
    """Under ``ci``, seed trio's scheduler per test: it reverses each batch of runnable tasks
    at random (trio/_core/_run.py ``_r``), so a test that depends on task order by mistake
    passes or fails the same way on every run instead of once in a while. Hypothesis seeds
    the same generator itself inside @given tests (trio registers it)."""
    if HYPOTHESIS_PROFILE != "ci":
        return
    import trio._core._run as trio_run

    rng = getattr(trio_run, "_r", None)
    if rng is not None:
        rng.seed(request.node.nodeid)


#: The collector runs after this many new container objects, not CPython's default 700 (see
#: pytest_configure).
GC_YOUNG_THRESHOLD = 10_000


def pytest_configure(config: pytest.Config) -> None:
    """The suite's process collects garbage less often: tests that build large structures (the
    decoded shared trace, 10,000 signed reports, Hypothesis's examples) made CPython run a full
    collection over them every few hundred thousand allocations, a fifth of the time of
    tests/unit's trace tests (4.1 s of GC in 20 s; 1.2 s with this). What waits is at most
    ~10,000 young objects, about a megabyte; every tracemalloc test passes with ten times
    that. Processes the tests start keep CPython's default.

    Children get Ctrl-C as a user's would. A shell starts a background job (``make test &``,
    ``nohup``) with SIGINT ignored, every process started from it inherits that, and Python
    then never installs its KeyboardInterrupt handler: the tests that press Ctrl-C on
    ``overflowd demo`` or ``--follow`` waited out their 30 s timeouts and failed."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header() -> str:
    return f"hypothesis profile: {HYPOTHESIS_PROFILE} ({settings.default})"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``fuzz``, scale every property's ``max_examples``; tests fix their own for CI."""
    if HYPOTHESIS_PROFILE != "fuzz":
        return
    for item in items:
        test = getattr(item, "obj", None)
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if own is None or not getattr(test, "is_hypothesis_test", False):
            continue
        test._hypothesis_internal_use_settings = settings(
            own, max_examples=own.max_examples * FUZZ_EXAMPLES_FACTOR, derandomize=False
        )


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
    """An open store on each backend. On SQLite it starts as a copy of a file migrated once
    (tests/support/stores.py: 10 ms, not 250); opening it still checks the revision. Migrating
    a new file is shown by the tests that open ``db_url`` themselves."""
    if db_url.startswith("sqlite:///"):
        sqlite_at_head(Path(db_url.removeprefix("sqlite:///")))
    with Store.open(db_url) as s:
        yield s
