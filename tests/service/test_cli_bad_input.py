"""Every command behaves on bad input: one line naming what is wrong, the right exit code,
nothing stored or created. Each case was a user's report against main; all run the real
console scripts as processes.

In each table of cases (a parametrized test) the first case runs the console script as a
process and the others call its ``main(argv)`` in this process (``tests.support.cli.call``:
the same parser, checks and exit codes, without a Python start per case): what the process
adds (its exit status, its streams, no traceback) is shown once per table, what each case
checks (the flag named, the code, nothing created) is shown for every case.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from overflowd.store import Store, default_url
from tests.support.cli import BIN, Result, call, run
from tests.support.trace import netflow_v5_trace


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    assert call("overflowd", "init", "--home", str(home)).code == 0  # a process: test_cli_node
    return home


Tool = Callable[..., Result]


@pytest.fixture
def tool(request: pytest.FixtureRequest) -> Tool:
    """``run`` (a process) for the first case of a parametrized test, ``call`` for the rest."""
    spec = getattr(request.node, "callspec", None)
    return run if spec is None or not any(spec.indices.values()) else call


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def one_line(result: Result, code: int, *names: str) -> str:
    """The error is exactly one line, exit ``code``, no traceback, and names each of ``names``."""
    assert result.code == code, (result.code, result.err)
    assert result.err.count("\n") == 1 and result.err.endswith("\n"), result.err
    assert "Traceback" not in result.err
    for name in names:
        assert name in result.err, (name, result.err)
    return result.err


def report(home: Path, *extra: str, tool: Tool = run) -> Result:
    return tool("overflowd", "report", "--home", str(home), "--src", "192.0.2.1",
               "--dst", "198.51.100.7", *extra)


# -- overflowd report ----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--sport", "--dport"])
@pytest.mark.parametrize("value", ["70000", "-1", "http"])
def test_report_port_out_of_range_says_the_range(home: Path, flag: str, value: str,
                                                 tool: Tool) -> None:
    before = files(home)
    err = one_line(report(home, flag, value, tool=tool), 2, flag, "0-65535")
    assert len(err) < 200
    assert files(home) == before


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--duration-ms", "-100"),
        ("--duration-ms", "1e3"),
        ("--duration-ms", str(2**64)),
        ("--packets", "-1"),
        ("--packets", str(2**64)),
        ("--bytes", "-1"),
        ("--bytes", str(2**64)),
        ("--proto", "256"),
        ("--kind", "Flow Seen"),
        ("--kind", "a" * 33),
        ("--src", "2001:db8::1"),  # families differ from --dst
    ],
)
def test_report_refuses_impossible_values(home: Path, flag: str, value: str, tool: Tool) -> None:
    before = files(home)
    one_line(report(home, flag, value, tool=tool), 2, flag)
    assert files(home) == before  # nothing signed into a store


def test_report_out_to_missing_directory_stores_nothing(home: Path, tmp_path: Path) -> None:
    before = files(home)
    out = tmp_path / "nonexistent" / "x"
    one_line(report(home, "--out", str(out)), 1, str(out))
    assert files(home) == before and not out.parent.exists()


def test_report_out_works_and_stores(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.cose"
    result = report(home, "--out", str(out), "--duration-ms", "100", "--packets", "0")
    assert result.code == 0, result.err
    assert out.read_bytes()[:1] == b"\xd2"
    assert (home / "overflowd.db").exists()


# -- overflowd key dns-record --------------------------------------------------------------------


@pytest.mark.parametrize("ttl", ["-5", str(2**31), "1h"])
def test_dns_record_ttl_out_of_range(home: Path, ttl: str, tool: Tool) -> None:
    result = tool("overflowd", "key", "dns-record", "--home", str(home), "--ttl", ttl)
    one_line(result, 2, "--ttl", "2147483647")


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("192.0.2.0/24", "_overflowd.2.0.192.in-addr.arpa."),
        ("192.0.2.7", "_overflowd.7.2.0.192.in-addr.arpa."),
        ("2001:db8::/32", "_overflowd.8.b.d.0.1.0.0.2.ip6.arpa."),
        ("Example.NET.", "_overflowd.example.net."),
        ("2.0.192.in-addr.arpa", "_overflowd.2.0.192.in-addr.arpa."),
    ],
)
def test_dns_record_name_is_a_domain_or_a_prefix(home: Path, name: str, owner: str,
                                                 tool: Tool) -> None:
    result = tool("overflowd", "key", "dns-record", "--home", str(home), "--name", name,
                  "--ttl", "0")
    assert result.code == 0, result.err
    assert result.out.split()[:4] == [owner, "0", "IN", "TXT"]


@pytest.mark.parametrize("name", ["192.0.2.0/22", "2001:db8::/36", "exa mple.net", "a..b", "-"])
def test_dns_record_bad_name(home: Path, name: str, tool: Tool) -> None:
    result = tool("overflowd", "key", "dns-record", "--home", str(home), "--name", name)
    one_line(result, 2, "--name")
    assert result.out == ""


# -- overflowd-query -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["reports", "events"])
@pytest.mark.parametrize("limit", ["-1", "0", "1e23", str(10**23), "ten"])
def test_query_limit_is_a_sane_positive_integer(home: Path, command: str, limit: str,
                                                tool: Tool) -> None:
    before = files(home)
    result = tool("overflowd-query", command, "--home", str(home), "--limit", limit)
    one_line(result, 2, "--limit")
    assert files(home) == before


@pytest.mark.parametrize(
    "argv",
    [
        ("overflowd-query", "reports"),
        ("overflowd-query", "events"),
        ("overflowd-query", "reports", "--json", "--limit", "5"),
    ],
)
def test_query_of_missing_store_creates_nothing(tmp_path: Path, home: Path,
                                                argv: tuple[str, ...], tool: Tool) -> None:
    db = tmp_path / "missing" / "dir" / "x.db"
    before = files(tmp_path)
    result = tool(*argv, "--home", str(home), "--db", f"sqlite:///{db}")
    one_line(result, 1, f"no store at {db}")
    assert files(tmp_path) == before


def test_query_of_home_without_store_creates_nothing(home: Path) -> None:
    before = files(home)
    result = run("overflowd-query", "reports", "--home", str(home))
    one_line(result, 1, f"no store at {home / 'overflowd.db'}")
    assert files(home) == before


def _run_read_only(home: Path, *argv: str) -> Result:
    """Run with ``home`` read-only for real: a read-only bind mount as root (root ignores
    modes), else chmod 555 on the home and 444 on its files."""
    script = [str(BIN / argv[0]), *argv[1:]]
    env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
    if os.geteuid() == 0:
        h = str(home)
        cmd = ["unshare", "-m", "sh", "-c",
               'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', h, *script]
        proc = subprocess.run(cmd, capture_output=True, env=env, timeout=60)
    else:
        for p in [home, *home.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            proc = subprocess.run(script, capture_output=True, env=env, timeout=60)
        finally:
            for p in [home, *home.iterdir()]:
                p.chmod(0o700 if p.is_dir() else 0o600)
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), proc.stdout)


def test_read_only_home_can_be_queried(home: Path) -> None:
    first = report(home, "--json")
    assert first.code == 0, first.err
    report_id = json.loads(first.out)["id"]
    before = {p: p.stat().st_mtime_ns for p in files(home)}
    for argv in (
        ("overflowd-query", "reports", "--json", "--home", str(home)),
        ("overflowd-query", "events", "--home", str(home)),
        ("overflowd", "key", "show", "--home", str(home)),
    ):
        result = _run_read_only(home, *argv)
        assert result.code == 0, (argv, result.err)
        if argv[1] == "reports":
            got = [json.loads(line)["report"]["id"] for line in result.out.splitlines()]
            assert got == [report_id]
    assert {p: p.stat().st_mtime_ns for p in files(home)} == before


@pytest.mark.parametrize("where", ["before", "after"])
def test_every_command_takes_home_and_db_before_or_after(home: Path, tmp_path: Path,
                                                         where: str) -> None:
    pcap = str(netflow_v5_trace())
    db = f"sqlite:///{tmp_path / 'other.db'}"
    common = ["--home", str(home), "--db", db]
    for cmd in (["decode", pcap, "--port", "9"], ["key", "show"], ["init", "--force"]):
        argv = [*common, *cmd] if where == "before" else [*cmd, *common]
        result = run("overflowd", *argv)
        assert result.code == 0, (argv, result.err)


# -- overflowd-query verify ----------------------------------------------------------------------


def test_verify_takes_raw_base64url_and_a_json_line(home: Path, tmp_path: Path) -> None:
    raw = tmp_path / "r.cose"
    assert report(home, "--out", str(raw)).code == 0
    lines = run("overflowd-query", "reports", "--json", "--home", str(home)).out.splitlines()
    assert len(lines) == 1
    cose_b64 = json.loads(lines[0])["report"]["cose"]
    inputs = {
        "raw": raw.read_bytes(),
        "b64": cose_b64.encode() + b"\n",
        "json": lines[0].encode() + b"\n",
    }
    for what, data in inputs.items():
        result = run("overflowd-query", "verify", "-", stdin=data)
        assert result.code == 0, (what, result.err)
        assert json.loads(result.out)["id"] == json.loads(lines[0])["report"]["id"]
    bad = run("overflowd-query", "verify", "-", stdin=b'{"id": "x"}\n')
    one_line(bad, 1, "cose")


# -- overflowd run: which socket failed ----------------------------------------------------------


def _busy_udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _busy_tcp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _daemon(home: Path, *extra: str) -> Result:
    # Port 0 unless the test names it: the default in-band port is fixed ([::]:65535), and
    # another daemon on the machine holding it made this test fail for the wrong socket.
    inband = () if "--inband-listen" in extra else ("--inband-listen", "127.0.0.1:0")
    return run(
        "overflowd", "run", "--home", str(home), "--metrics", "", "--api", "", *inband, *extra,
        timeout=30,
    )


def test_run_names_the_collector_socket_in_use(home: Path) -> None:
    with _busy_udp() as busy:
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        one_line(_daemon(home, "--listen", addr), 1, f"--listen {addr}", "Address already in use")


def test_run_names_the_metrics_socket_in_use(home: Path) -> None:
    with _busy_tcp() as busy:
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        result = run("overflowd", "run", "--home", str(home), "--listen", "127.0.0.1:0",
                     "--metrics", addr, "--api", "", timeout=30)
        one_line(result, 1, f"--metrics {addr}", "Address already in use")


def test_run_names_the_inband_socket_in_use(home: Path) -> None:
    (home / "overflowd.toml").write_text("[inband]\nenabled = true\n")
    with _busy_udp() as busy:
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        result = _daemon(home, "--listen", "127.0.0.1:0", "--inband-listen", addr)
        one_line(result, 1, f"--inband-listen {addr}", "Address already in use")


@pytest.mark.parametrize("flag", ["--listen", "--metrics", "--inband-listen", "--api"])
@pytest.mark.parametrize("value", ["no-such-host.invalid:2055", "127.0.0.1", "127.0.0.1:70000"])
def test_run_names_a_bad_address(home: Path, flag: str, value: str, tool: Tool) -> None:
    (home / "overflowd.toml").write_text("[inband]\nenabled = true\n")
    extra = {
        "--listen": "127.0.0.1:0", "--metrics": "", "--inband-listen": "127.0.0.1:0", "--api": ""
    }
    extra[flag] = value
    argv = [x for k, v in extra.items() for x in (k, v)]
    result = tool("overflowd", "run", "--home", str(home), *argv, timeout=30)
    # A name is refused before any lookup (a test sends nothing off the machine, and a daemon
    # binds addresses, not what a resolver says today).
    one_line(result, 2, f"{flag} {value}")
    assert not (home / "overflowd.db").exists()


# -- overflowd replay ----------------------------------------------------------------------------


def test_replay_cut_by_a_corrupt_frame_says_what_it_stored(home: Path, tmp_path: Path) -> None:
    data = netflow_v5_trace().read_bytes()
    cut = tmp_path / "cut.pcap"
    # The first 400 kB, then a record header claiming a 1 GiB frame: corrupt, not truncated.
    bad_header = (0).to_bytes(4, "little") * 2 + (2**30).to_bytes(4, "little") * 2
    cut.write_bytes(data[:24] + _whole_records(data, 400_000) + bad_header + b"\0" * 64)
    result = run("overflowd", "replay", str(cut), "--home", str(home), "--rate", "1e-3")
    err = one_line(result, 1, str(cut))
    store = Store.open(default_url(home))
    try:
        stored = len(store.query_reports())
    finally:
        store.close()
    assert stored > 0
    assert f"{stored} reports stored" in err


def _whole_records(data: bytes, upto: int) -> bytes:
    """pcap records after the 24-byte file header, whole ones only, up to ``upto`` bytes."""
    out, pos = bytearray(), 24
    while pos + 16 <= len(data):
        incl = int.from_bytes(data[pos + 8 : pos + 12], "little")
        if len(out) + 16 + incl > upto:
            break
        out += data[pos : pos + 16 + incl]
        pos += 16 + incl
    return bytes(out)


@pytest.mark.parametrize(
    ("argv", "code", "names"),
    [
        (("replay", "{missing}"), 1, ("{missing}",)),
        (("replay", "{empty}"), 1, ("{empty}", "not a capture")),
        (("replay", "{pcap}", "--port", "70000"), 2, ("--port",)),
        (("replay", "{pcap}", "--rate", "nan"), 2, ("--rate",)),
        (("replay", "{pcap}", "--sampling-override", "x"), 1, ("--sampling-override",)),
    ],
)
def test_replay_bad_input_creates_no_store(home: Path, tmp_path: Path, argv: tuple[str, ...],
                                           code: int, names: tuple[str, ...], tool: Tool) -> None:
    (tmp_path / "empty.pcap").write_bytes(b"")
    paths = {"missing": str(tmp_path / "missing.pcap"), "empty": str(tmp_path / "empty.pcap"),
             "pcap": str(netflow_v5_trace())}
    before = files(home)
    result = tool("overflowd", *(a.format(**paths) for a in argv), "--home", str(home))
    one_line(result, code, *(n.format(**paths) for n in names))
    assert files(home) == before


@pytest.mark.parametrize(
    ("flag", "value"), [("--boost", "nan"), ("--boost", "0.5"), ("--url", "ftp://x")]
)
def test_dns_record_bad_flag_named(home: Path, flag: str, value: str, tool: Tool) -> None:
    result = tool("overflowd", "key", "dns-record", "--home", str(home), flag, value)
    one_line(result, 2, f"{flag}: ")
    assert result.out == ""


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("contact", "192.0.2.1", "--resolver", "nonsense"), "--resolver"),
        (("contact", "192.0.2.1", "--resolver", "127.0.0.1:53", "--timeout", "-1"), "--timeout"),
        (("contact", "192.0.2.1", "--resolver", "127.0.0.1:53", "--timeout", "nan"), "--timeout"),
        (("reports", "--since", "yesterday"), "--since"),
        (("events", "--since", "yesterday"), "--since"),
    ],
)
def test_query_flags_named_before_any_lookup(home: Path, argv: tuple[str, ...], flag: str,
                                             tool: Tool) -> None:
    before = files(home)
    one_line(tool("overflowd-query", *argv, "--home", str(home)), 2, flag)
    assert files(home) == before
