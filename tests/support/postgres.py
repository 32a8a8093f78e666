"""A real, throwaway PostgreSQL server for the test suite.

DESIGN.md promises that PostgreSQL works "with the same code, tested on a real server", so the
suite starts one instead of mocking: Debian's ``postgresql`` package provides the binaries
(``make test`` installs it), ``initdb`` makes a cluster in a temporary directory, ``pg_ctl``
runs it on a free loopback port with its Unix socket inside that directory, and the cluster is
stopped and deleted afterwards, even when the tests fail. One cluster per test session; each
test that needs isolation gets its own empty schema (:meth:`PostgresServer.schema`, about a
millisecond) or, when it must, its own database (:meth:`PostgresServer.database`).

PostgreSQL refuses to run as root, so when the suite runs as root (as ``make test`` does) the
server runs as the ``postgres`` system user through ``runuser``. Tuned for speed, not
durability (``fsync=off``): nothing here outlives the session.

Missing binaries are a :class:`PostgresUnavailable` error, never a skip: the conftest turns it
into a loud failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg import sql

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
#: how long the server may take to accept connections after ``pg_ctl start``
START_TIMEOUT_S = 60
#: how long any one helper command may run before we give up on it
COMMAND_TIMEOUT_S = 120


class PostgresUnavailable(RuntimeError):
    """PostgreSQL binaries are missing or the server would not start; the message says how."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb, pg_ctl and postgres."""
    candidates = []
    for path in PG_ROOT.glob("*/bin"):
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            try:
                major = int(path.parent.name)
            except ValueError:
                major = 0
            candidates.append((major, path))
    if not candidates:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries not found under {PG_ROOT}/*/bin: the store tests need a "
            "real server. Install it with 'apt-get install postgresql' (make test does this)."
        )
    return max(candidates)[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One throwaway cluster. Use as a context manager, or call start() and stop()."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.base: Path | None = None
        self.port = 0
        self._running = False
        self._as_user: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """initdb, start on a free port, wait until it accepts connections (bounded)."""
        self.base = Path(tempfile.mkdtemp(prefix="overflowd-pg-"))
        try:
            if os.geteuid() == 0:
                try:
                    owner = pwd.getpwnam(SUPERUSER)
                except KeyError:
                    raise PostgresUnavailable(
                        f"running as root but there is no {SUPERUSER!r} system user to run the "
                        "server as (the Debian postgresql package creates it)"
                    ) from None
                os.chown(self.base, owner.pw_uid, owner.pw_gid)
                self._as_user = ["runuser", "-u", SUPERUSER, "--"]
            self._run(
                "initdb",
                "-D", str(self.datadir),
                "-U", SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            )  # fmt: skip
            self._start_on_free_port()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _start_on_free_port(self) -> None:
        # A free port can be taken between probing and binding; try a few.
        for _attempt in range(5):
            self.port = free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-p {self.port}",
                    f"-k {self.base}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            result = self._run(
                "pg_ctl",
                "-D", str(self.datadir),
                "-l", str(self.logfile),
                "-o", options,
                "-w", "-t", str(START_TIMEOUT_S),
                "start",
                check=False,
            )  # fmt: skip
            if result.returncode == 0:
                self._running = True
                return
            if "already in use" not in self.log_tail():
                break
        raise PostgresUnavailable(f"PostgreSQL did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error = ""
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise PostgresUnavailable(
            f"PostgreSQL on port {self.port} not ready after {START_TIMEOUT_S}s: {last_error}\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster; safe to call twice."""
        try:
            if self._running:
                self._run(
                    "pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop", check=False
                )
                self._running = False
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------

    def dsn(self, dbname: str) -> str:
        """A libpq connection string (for psycopg directly)."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def url(self, dbname: str) -> str:
        """A SQLAlchemy URL (what Store.open takes)."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def createdb(self, dbname: str) -> None:
        """Create a database with the ``createdb`` client, as an operator would."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, dbname)

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database with a unique name; returns the name."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it (PostgreSQL 13+)."""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @contextlib.contextmanager
    def database(self, prefix: str = "t") -> Iterator[str]:
        """A fresh database for the duration of the block; yields its SQLAlchemy URL.

        CREATE DATABASE copies template1 and takes a few hundred milliseconds; for one
        database per test prefer :meth:`schema`.
        """
        name = self.create_database(prefix)
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)

    @contextlib.contextmanager
    def schema(self, dbname: str, prefix: str = "t") -> Iterator[str]:
        """A fresh, empty schema in ``dbname`` for the block; yields a SQLAlchemy URL using it.

        The URL sets ``search_path`` to that schema alone, so code that creates unqualified
        tables (the store's migrations, ``alembic_version``) sees an empty database of its own.
        About a millisecond, against hundreds for CREATE DATABASE.
        """
        name = f"{prefix}_{secrets.token_hex(6)}"
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        try:
            yield f"{self.url(dbname)}?options=-csearch_path%3D{name}"
        finally:
            with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))

    # -- helpers ------------------------------------------------------------------------------

    @property
    def datadir(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "data"

    @property
    def logfile(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "server.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no server log)"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command: Sequence[str] = [*self._as_user, str(self.bin_dir / tool), *args]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                cwd=self.base,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{tool} failed: {exc}") from exc
        if check and result.returncode != 0:
            raise PostgresUnavailable(
                f"{tool} exited with {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result
