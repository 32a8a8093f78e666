"""Sign, store, query and verify through the CLIs, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from overflowd import report as rpt
from overflowd.identity import load_identity, verify_report
from tests.support.cli import run


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(
        '[node]\ncontacts = ["mailto:abuse@example.net"]\nobservation_point = "edge-1"\n'
    )
    return home


def sign(home: Path, db_url: str, src: str, dst: str, *extra: str) -> str:
    result = run("overflowd", "report", "--home", str(home), "--db", db_url,
                 "--src", src, "--dst", dst, "--proto", "udp", "--sport", "123",
                 "--packets", "500", "--bytes", "38000", *extra)
    assert result.code == 0, result.err
    return result.out.strip()


def query(home: Path, db_url: str, *args: str) -> list[dict[str, object]]:
    result = run("overflowd-query", "reports", "--json", "--home", str(home), "--db", db_url,
                 *args)
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def test_prefix_queries_return_exactly_the_matching_reports(home: Path, db_url: str) -> None:
    ids = {
        "a": sign(home, db_url, "192.0.2.1", "198.51.100.7"),
        "b": sign(home, db_url, "192.0.2.2", "198.51.100.200"),
        "c": sign(home, db_url, "203.0.113.9", "192.0.2.77"),
        "d": sign(home, db_url, "2001:db8:1::1", "2001:db8:2::2"),
        "e": sign(home, db_url, "2001:db8:1::5", "2001:db8:3::3"),
    }
    got = lambda *a: {r["report"]["id"] for r in query(home, db_url, *a)}  # noqa: E731
    assert got() == set(ids.values())
    assert got("--dst", "198.51.100.0/24") == {ids["a"], ids["b"]}
    assert got("--dst", "198.51.100.7") == {ids["a"]}
    assert got("--src", "192.0.2.0/24") == {ids["a"], ids["b"]}
    assert got("--dst", "192.0.2.0/24") == {ids["c"]}
    assert got("--src", "2001:db8:1::/48") == {ids["d"], ids["e"]}
    assert got("--dst", "2001:db8:3::3/128") == {ids["e"]}
    assert got("--src", "0.0.0.0/0") == {ids["a"], ids["b"], ids["c"]}
    assert got("--since", "1h") == set(ids.values())
    assert got("--since", "2999-01-01T00:00:00Z") == set()


def test_json_lines_carry_fields_and_verifiable_cose(home: Path, db_url: str) -> None:
    report_id = sign(home, db_url, "192.0.2.1", "198.51.100.7", "--dport", "4444")
    # The API's object (GET /v1/reports): this node's facts, and the report as signed.
    (row,) = query(home, db_url)
    assert row["via"] == "local" and row["trust"] is None and row["seq"] == 1
    report: dict[str, Any] = row["report"]  # type: ignore[assignment]
    assert report["id"] == report_id
    assert report["flow"]["dport"] == 4444 and report["flow"]["packets"] == 500
    assert report["observer"]["contacts"] == ["mailto:abuse@example.net"]
    signed = verify_report(rpt.b64url_decode(str(report["cose"])))
    assert signed.report_id == report_id
    assert signed.observer_key == load_identity(home).public_key


def test_table_for_people(home: Path, db_url: str) -> None:
    sign(home, db_url, "192.0.2.1", "198.51.100.7")
    result = run("overflowd-query", "reports", "--home", str(home), "--db", db_url)
    header, line = result.out.splitlines()
    assert header.split()[:6] == ["FLOW", "START", "(UTC)", "DUR", "SRC", "SPORT"]
    assert "192.0.2.1" in line and "udp" in line and load_identity(home).fingerprint in line
    assert "1 report" in result.err


def test_verify_accepts_raw_and_base64url_and_rejects_tampering(home: Path, tmp_path: Path,
                                                                db_url: str) -> None:
    out = tmp_path / "r.cose"
    sign(home, db_url, "192.0.2.1", "198.51.100.7", "--out", str(out))
    raw = out.read_bytes()
    ok = run("overflowd-query", "verify", str(out))
    assert ok.code == 0 and json.loads(ok.out)["flow"]["dst"] == "198.51.100.7"
    from_stdin = run("overflowd-query", "verify", "-", stdin=rpt.b64url(raw).encode() + b"\n")
    assert from_stdin.code == 0 and json.loads(from_stdin.out)["id"] == rpt.report_id(raw)
    tampered = bytearray(raw)
    tampered[-1] ^= 0x01
    bad = run("overflowd-query", "verify", "-", stdin=bytes(tampered))
    assert bad.code == 1 and bad.out == ""
    assert bad.err.strip() == "overflowd-query: invalid report: signature does not verify"
    junk = run("overflowd-query", "verify", "-", stdin=b"hello")
    assert junk.code == 1 and junk.err.count("\n") == 1


def test_unreachable_database_is_one_line(home: Path) -> None:
    result = run("overflowd-query", "reports", "--home", str(home),
                 "--db", "postgresql+psycopg://nobody@127.0.0.1:9/none")
    assert result.code == 1 and result.err.count("\n") == 1
    assert result.err.startswith("overflowd-query: error:")
