"""``overflowd-query`` imports only what the command needs (issue #16, start-up).

Each import is start-up CPU in every process a person or a script runs: trio with dnspython
is about a quarter second, httpx a third, numpy a tenth, SQLAlchemy's PostgreSQL dialect
(asyncpg's adapter) 35 ms. These run the real command in a fresh interpreter with
``-X importtime`` and read which packages it loaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from overflowd.store import Store
from tests.support.query_reports import seed_store

#: never needed to list reports as JSON from a SQLite store (stdlib sqlite3 reads it:
#: overflowd.store.fastread)
HEAVY = ("trio", "dns", "httpx", "numpy", "rich", "sqlalchemy", "alembic", "nacl")


def loaded(argv: list[str], home: Path) -> tuple[set[str], str]:
    """Run ``overflowd-query ARGV`` in a new process; the modules it imported and its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERFLOWD")}
    cmd = [sys.executable, "-X", "importtime", "-m", "overflowd.cli.query", *argv]
    proc = subprocess.run(
        [*cmd, "--home", str(home)], capture_output=True, timeout=30, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names, proc.stdout


def has(names: set[str], package: str) -> bool:
    return any(n == package or n.startswith(package + ".") for n in names)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("cli-imports")
    with Store.open(f"sqlite:///{home / 'overflowd.db'}") as store:
        seeded = seed_store(store, 40, seed=5)
    return home, str(seeded.reports[0].dst)


def test_reports_as_json_imports_no_dns_http_numpy_or_tables(home: tuple[Path, str]) -> None:
    path, dst = home
    names, out = loaded(["reports", "--dst", dst, "--json"], path)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and all(r["report"]["flow"]["dst"] == dst for r in rows)
    assert "sqlite3" in names and "overflowd.store.fastread" in names  # the store is read
    assert [p for p in HEAVY if has(names, p)] == []


def test_reports_table_into_a_pipe_imports_no_rich_or_sqlalchemy(home: tuple[Path, str]) -> None:
    path, dst = home
    names, out = loaded(["reports", "--dst", dst], path)
    assert out.startswith("FLOW START (UTC)") and dst in out
    assert [p for p in HEAVY if has(names, p)] == []


def test_who_with_dns_configured_still_imports_trio_and_dnspython(
    home: tuple[Path, str], tmp_path: Path
) -> None:
    path, _ = home
    (tmp_path / "overflowd.db").write_bytes((path / "overflowd.db").read_bytes())
    # a resolver on loopback that never answers: the lookups are made, and time out quickly
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))
        port = mute.getsockname()[1]
        (tmp_path / "overflowd.toml").write_text(
            f'[registry]\nnameservers = ["127.0.0.1:{port}"]\ntimeout_s = 0.2\n'
        )
        names, out = loaded(["who", "--json"], tmp_path)
    assert len(out.splitlines()) == 3  # three observers
    assert has(names, "trio") and has(names, "dns")
    assert not has(names, "httpx") and not has(names, "numpy")
