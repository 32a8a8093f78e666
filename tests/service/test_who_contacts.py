"""``who``'s contacts from DNS: the records and abuse zones of the networks observers report from.

A real Knot DNS server on loopback publishes an ``_overflowd`` record for 192.0.2.0/24 naming
observer A's key, one for 203.0.113.0/24 naming some other key (observer B reports from there),
and an abuse zone answering for both networks. The store is seeded as the daemon writes it
(reports with their sender networks, ``observer_networks`` rows by ``save_continuity``). The CLI
on the store, the node's ``/v1/who`` and the CLI with ``--remote`` must give the same rows; a
nameserver that never answers must give ``error: "timeout"`` within the budget.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from overflowd.cli import query
from overflowd.identity import NodeIdentity
from overflowd.registry import format_record, split_txt
from overflowd.services.who_dns import WHO_DNS_BUDGET_S
from overflowd.store import Store
from overflowd.store.continuity import save_continuity
from overflowd.store.repository import default_url
from overflowd.trust import NetworkSighting
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.knot import KnotServer, running_knot, soa_zone
from tests.support.reports import make_payload

A = NodeIdentity(seed=b"\x21" * 32)
B = NodeIdentity(seed=b"\x22" * 32)
OTHER_KEY = b"\x23" * 32
C = NodeIdentity(seed=b"\x24" * 32)  # heard only in band: no observer_networks
D = NodeIdentity(seed=b"\x25" * 32)  # in band too, its sources' record names another key
NET_C = "198.18.5.0/24"
NET_A, NET_B = "192.0.2.0/24", "203.0.113.0/24"
DST = "198.51.100.0/24"


def txt(key: bytes, *contacts: str) -> str:
    return " ".join(f'"{s}"' for s in split_txt(format_record(key, list(contacts))))


ZONES = {
    "2.0.192.in-addr.arpa": soa_zone(
        "2.0.192.in-addr.arpa", f"_overflowd 60 IN TXT {txt(A.public_key, 'mailto:noc@a.test')}"
    ),
    "113.0.203.in-addr.arpa": soa_zone(
        "113.0.203.in-addr.arpa", f"_overflowd 60 IN TXT {txt(OTHER_KEY, 'mailto:noc@x.test')}"
    ),
    "5.18.198.in-addr.arpa": soa_zone(
        "5.18.198.in-addr.arpa", f"_overflowd 60 IN TXT {txt(C.public_key, 'mailto:noc@c.test')}"
    ),
    # the parent, so that a walk above a /24 gets NXDOMAIN rather than REFUSED
    "in-addr.arpa": soa_zone("in-addr.arpa", ""),
    "abuse.test": soa_zone(
        "abuse.test",
        '0.2.0.192 60 IN TXT "abuse@a.test"\n0.113.0.203 60 IN TXT "abuse@b.test"',
    ),
}


def registry_toml(nameserver: str, *, timeout_s: float = 2.0) -> str:
    return (
        f'[registry]\nnameservers = ["{nameserver}"]\nabuse_zones = ["abuse.test"]\n'
        f"timeout_s = {timeout_s}\n"
    )


def seed(home: Path) -> None:
    """Reports of A (in band from 192.0.2.0/24, and earlier from 10.9.9.0/24) and of B (from
    203.0.113.0/24) toward DST, as the daemon stores them."""
    now = int(time.time() * 1000)
    with Store.open(default_url(home)) as store:
        rows, senders = [], {}
        for ident, net, n in ((A, NET_A, 3), (B, NET_B, 2)):
            for i in range(n):
                signed = ident.sign_report(
                    make_payload(net.split("/")[0][:-1] + "7", "198.51.100.9", time_ms=now - i)
                )
                rows.append((signed, now, "udp"))
                senders[signed.report_id] = net
        store.add_new_reports(rows, senders=senders)
        save_continuity(
            store,
            [
                NetworkSighting(A.public_key, NET_A, now - 5_000, now, 3),
                NetworkSighting(A.public_key, "10.9.9.0/24", now - 90_000, now - 60_000, 1),
                NetworkSighting(A.public_key, "10.9.8.0/24", now - 99_000, now - 95_000, 1),
                NetworkSighting(B.public_key, NET_B, now - 5_000, now, 2),
            ],
        )


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    with running_knot(ZONES) as server:
        yield server


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, knot: KnotServer) -> Iterator[tuple[Path, str]]:
    """(the node's home, its API base URL): a daemon over the seeded store, asking Knot."""
    home = tmp_path_factory.mktemp("who-contacts") / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(registry_toml(knot.address))
    seed(home)
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    try:
        yield home, daemon.line("api ").split()[1].rstrip("/")
    finally:
        code, output = daemon.stop()
        assert code == 0, output


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = query.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def by_fingerprint(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["observer"]["fingerprint"]: r for r in rows}


def test_cli_api_and_remote_give_the_same_contacts_from_dns(
    node: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, api = node
    code, out, err = cli(capsys, "who", "--home", str(home), "--dst", DST, "--json")
    assert code == 0, err
    local = lines(out)
    answer = httpx.get(f"{api}/who", params={"dst": DST}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["observers"] == local
    code, out, err = cli(capsys, "who", "--remote", api, "--dst", DST, "--json")
    assert code == 0, err
    assert lines(out) == local

    rows = by_fingerprint(local)
    assert rows[A.fingerprint]["registry"] == [
        {
            "network": NET_A,
            "contacts": ["mailto:noc@a.test"],
            "abuse_contacts": ["mailto:abuse@a.test"],
            "record_names_key": True,
            "error": None,
        },
        # the second most recently seen network: nothing published for 10.9.9.0/24 (the
        # in-addr.arpa zone answers NXDOMAIN); 10.9.8.0/24, seen before it, is not asked
        {
            "network": "10.9.9.0/24",
            "contacts": [],
            "abuse_contacts": [],
            "record_names_key": False,
            "error": None,
        },
    ]
    # 203.0.113.0/24's record names another key: its contacts are not B's
    assert rows[B.fingerprint]["registry"] == [
        {
            "network": NET_B,
            "contacts": [],
            "abuse_contacts": ["mailto:abuse@b.test"],
            "record_names_key": False,
            "error": None,
        }
    ]


def test_the_table_shows_the_contacts_from_dns(
    node: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, api = node
    code, local, err = cli(capsys, "who", "--home", str(home), "--dst", DST)
    assert code == 0, err
    assert "CONTACTS FROM DNS" in local.splitlines()[0]
    assert f"{NET_A} mailto:noc@a.test mailto:abuse@a.test; 10.9.9.0/24 -" in local
    assert f"{NET_B} mailto:abuse@b.test" in local
    code, remote, err = cli(capsys, "who", "--remote", api, "--dst", DST)
    assert code == 0, err
    assert remote == local


def test_no_dns_leaves_the_registry_out_everywhere(
    node: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, api = node
    code, out, err = cli(capsys, "who", "--home", str(home), "--dst", DST, "--json", "--no-dns")
    assert code == 0, err
    local = lines(out)
    assert len(local) == 2 and all(r["registry"] is None for r in local)
    answer = httpx.get(f"{api}/who", params={"dst": DST, "dns": "false"}, timeout=10)
    assert answer.json()["observers"] == local
    code, out, err = cli(capsys, "who", "--remote", api, "--dst", DST, "--json", "--no-dns")
    assert code == 0, err
    assert lines(out) == local


def test_a_silent_nameserver_is_a_timeout_within_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives every question, answers none
        host, port = silent.getsockname()
        # a question timeout longer than the budget: the budget must cut the lookups
        (home / "overflowd.toml").write_text(registry_toml(f"{host}:{port}", timeout_s=30.0))
        seed(home)
        started = time.monotonic()
        code, out, err = cli(capsys, "who", "--home", str(home), "--dst", DST, "--json")
        took = time.monotonic() - started
    assert code == 0, err
    # the budget, not the 30 s question timeout (slack for the store query on a loaded machine)
    assert WHO_DNS_BUDGET_S - 0.1 < took < WHO_DNS_BUDGET_S + 4.0, took
    rows = by_fingerprint(lines(out))
    assert [r["error"] for r in rows[A.fingerprint]["registry"]] == ["timeout", "timeout"]
    assert rows[B.fingerprint]["registry"] == [
        {
            "network": NET_B,
            "contacts": [],
            "abuse_contacts": [],
            "record_names_key": None,
            "error": "timeout",
        }
    ]
    # the report's own contacts are there all the same
    assert rows[A.fingerprint]["contacts"] == ["mailto:abuse@example.net"]


def test_observers_heard_only_in_band_get_contacts_from_the_networks_their_reports_name(
    tmp_path: Path, knot: KnotServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """No sighting proves where C and D report from (in band only), so their rows ask about
    the networks their reports name as sources: C's record names C's key (its contact
    counts), D's sources' record names another key (nothing from it but the abuse zone)."""
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(registry_toml(knot.address))
    now = int(time.time() * 1000)
    with Store.open(default_url(home)) as store:
        store.add_reports(
            [
                (ident.sign_report(make_payload(src, "198.51.100.9", time_ms=now - i)), now, "udp")
                for ident, src in ((C, "198.18.5.7"), (D, "203.0.113.7"))
                for i in range(2)
            ]
        )
    code, out, err = cli(capsys, "who", "--home", str(home), "--dst", DST, "--json")
    assert code == 0, err
    rows = {r["observer"]["key"]: r for r in lines(out)}
    c = rows[base64.b64encode(C.public_key).decode()]["registry"]
    d = rows[base64.b64encode(D.public_key).decode()]["registry"]
    assert [(x["network"], x["contacts"], x["record_names_key"]) for x in c] == [
        (NET_C, ["mailto:noc@c.test"], True)
    ], c
    assert [(x["network"], x["contacts"], x["record_names_key"]) for x in d] == [
        (NET_B, [], False)
    ], d
    assert d[0]["abuse_contacts"] == ["mailto:abuse@b.test"] and d[0]["error"] is None
