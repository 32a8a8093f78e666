"""Several nodes, one database (issue #15, docs/deploy-multinode.md), in network namespaces.

Four namespaces stand for four hosts: ``db`` runs a real PostgreSQL (a fresh cluster, an empty
database) listening on its TEST-NET addresses; ``a`` and ``b`` each run a real ``overflowd run``
collector (its own home and identity) whose ``store.url`` points at ``db`` over TCP; ``c`` runs
only ``overflowd-query``. Nothing reaches the host's network.

The migration race is forced, not hoped for: the test holds the store's migration advisory
lock before the two collectors start together, waits until both are blocked on it (both found
the database empty and both want to create the schema), then lets go. With
``log_statement = ddl`` the server logs each CREATE TABLE: the reports table is created once,
and both daemons run. Each collector then takes one NetFlow v5 datagram (sampling rate 1, so
each record is a report) and ``overflowd-query`` in ``c`` sees both nodes' reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from overflowd.identity import load_identity
from overflowd.store.repository import _MIGRATION_LOCK_ID, SCHEMA_HEAD
from tests.support import netns
from tests.support.cli import BIN, call
from tests.support.postgres import PostgresServer, free_port
from tests.unit.test_wire_v5 import v5

PREFIX = "ops"
WAIT_S = 60
DB_A, NODE_A = "192.0.2.1", "192.0.2.2"
DB_B, NODE_B = "198.51.100.1", "198.51.100.2"
DB_C, NODE_C = "203.0.113.1", "203.0.113.2"
DBNAME = "overflowd"

SEND = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.sendto(bytes.fromhex(sys.argv[1]), ('127.0.0.1', int(sys.argv[2])))\n"
)


class NamespacedPostgres(PostgresServer):
    """The suite's throwaway cluster, run inside ``ns`` and listening on its addresses.

    Everything the helper runs (initdb, pg_ctl) runs in the namespace; the test itself reaches
    the server through its Unix socket (the filesystem is shared), the nodes over TCP."""

    def __init__(self, ns: netns.Namespace) -> None:
        super().__init__()
        self.ns = ns

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        saved = self._as_user
        self._as_user = [*self.ns.argv([]), *saved]
        try:
            return super()._run(tool, *args, check=check)
        finally:
            self._as_user = saved

    def _start_on_free_port(self) -> None:
        # The nodes' networks, as an operator writes them (docs/deploy-multinode.md).
        with open(self.datadir / "pg_hba.conf", "a", encoding="ascii") as hba:
            for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"):
                hba.write(f"host {DBNAME} postgres {net} trust\n")
        self.port = free_port()
        options = " ".join([
            "-c listen_addresses='*'", f"-p {self.port}", f"-k {self.base}",
            "-c fsync=off", "-c synchronous_commit=off", "-c log_statement=ddl",
        ])
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options,
                  "-w", "-t", "60", "start")
        self._running = True

    def dsn(self, dbname: str) -> str:
        return f"host={self.base} port={self.port} user=postgres dbname={dbname}"

    def tcp_url(self, host: str) -> str:
        return f"postgresql+psycopg://postgres@{host}:{self.port}/{DBNAME}"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, netns.Namespace]]:
    try:
        netns.require("ip", "ethtool")
    except netns.NetnsUnavailable as exc:
        pytest.fail(f"netns test cannot run: {exc}", pytrace=False)
    with (
        netns.namespace(tmp_path, prefix=PREFIX) as db,
        netns.namespace(tmp_path, prefix=PREFIX) as a,
        netns.namespace(tmp_path, prefix=PREFIX) as b,
        netns.namespace(tmp_path, prefix=PREFIX) as c,
    ):
        netns.veth(db, a, [f"{DB_A}/24"], [f"{NODE_A}/24"])
        netns.veth(db, b, [f"{DB_B}/24"], [f"{NODE_B}/24"])
        netns.veth(db, c, [f"{DB_C}/24"], [f"{NODE_C}/24"])
        yield {"db": db, "a": a, "b": b, "c": c}


def node_home(root: Path, name: str, url: str) -> Path:
    home = root / name
    assert call("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(
        f'[store]\nurl = "{url}"\n[sampling]\nrate = 1.0\n'
        '[collector]\nlisten = ["127.0.0.1:0"]\n[inband]\nenabled = false\n'
        '[api]\nlisten = ""\n[metrics]\nlisten = ""\n'
        '[registry]\nnameservers = ["127.0.0.1:9"]\ntimeout_s = 0.5\n'
    )
    return home


def waiting_on_migration_lock(server: NamespacedPostgres) -> int:
    with psycopg.connect(server.dsn(DBNAME), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND ((classid::bigint << 32) | objid::bigint) = %s",
            (_MIGRATION_LOCK_ID,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_two_collectors_one_postgresql_schema_once_query_sees_both(
    lab: dict[str, netns.Namespace], tmp_path: Path
) -> None:
    server = NamespacedPostgres(lab["db"])
    server.start()
    try:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        homes = {
            "a": node_home(tmp_path, "a", server.tcp_url(DB_A)),
            "b": node_home(tmp_path, "b", server.tcp_url(DB_B)),
        }
        # -- both start together on an empty database, the race forced by the lock ----------
        holder = psycopg.connect(server.dsn(DBNAME), autocommit=True)
        try:
            holder.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
            procs = {
                name: lab[name].spawn([str(BIN / "overflowd"), "run", "--home", str(home)],
                                      label=f"overflowd-{name}")
                for name, home in homes.items()
            }
            deadline = time.monotonic() + WAIT_S
            while waiting_on_migration_lock(server) < 2:
                for name, proc in procs.items():
                    assert proc.popen.poll() is None, (name, proc.output())
                assert time.monotonic() < deadline, "both daemons never waited on the lock"
                time.sleep(0.05)
        finally:
            holder.close()  # lets go of the lock: one migrates, the other finds it done
        ports = {}
        for name, proc in procs.items():
            proc.wait_for_output(r"listening udp 127\.0\.0\.1:\d+", WAIT_S)
            ports[name] = int(proc.output().split("listening udp 127.0.0.1:", 1)[1].split()[0])
        log = server.logfile.read_text(errors="replace")
        assert log.count("CREATE TABLE reports") == 1, log[-3000:]
        assert "already exists" not in log and "duplicate key" not in log, log[-3000:]
        with psycopg.connect(server.dsn(DBNAME), autocommit=True) as conn:
            versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        assert versions == [(SCHEMA_HEAD,)]
        # -- each collector reports what it saw, into the one database ------------------------
        sent: dict[str, set[str]] = {}
        for i, name in enumerate(("a", "b")):
            src = 0xC0000200 + 10 + i  # 192.0.2.10 / .11
            records = [{"src": src, "sport": 1000 + n, "packets": 5} for n in range(3)]
            datagram = v5(records, secs=int(time.time()))
            lab[name].run([sys.executable, "-c", SEND, datagram.hex(), str(ports[name])])
            sent[name] = {f"192.0.2.{10 + i}"}
        keys = {name: load_identity(home).public_key_b64 for name, home in homes.items()}
        seen: dict[str, set[str]] = {}
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            out = lab["c"].run([str(BIN / "overflowd-query"), "reports", "--json",
                                "--db", server.tcp_url(DB_C)], timeout=WAIT_S).stdout
            seen = {}
            for line in out.splitlines():
                if line.startswith("{"):
                    report = json.loads(line)["report"]
                    seen.setdefault(report["observer"]["key"], set()).add(report["flow"]["src"])
            if all(len(seen.get(keys[n], ())) >= 1 for n in keys) and sum(
                1 for line in out.splitlines() if line.startswith("{")
            ) >= 6:
                break
            time.sleep(0.2)
        assert seen.get(keys["a"]) == sent["a"], seen
        assert seen.get(keys["b"]) == sent["b"], seen
        for name, proc in procs.items():
            assert proc.stop() == 0, (name, proc.output()[-2000:])
    finally:
        server.stop()
