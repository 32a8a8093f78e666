"""``overflowd decode``: one port, four formats, one record per line; errors in one line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overflowd.cli import cmd_decode
from overflowd.flows import FlowRecord
from tests.unit.test_wire_encoder import (
    IE,
    ethernet,
    flowset,
    ipfix_message,
    ipfix_template,
    ipv4,
    pcap_file,
    record,
    sflow_datagram,
    sflow_flow_sample,
    sflow_raw_header,
    tcp,
    udp_frame,
    v9_packet,
    v9_template,
)

KEYS = [
    "src",
    "dst",
    "sport",
    "dport",
    "proto",
    "packets",
    "bytes",
    "first",
    "last",
    "tcp_flags",
    "tos",
    "src_as",
    "dst_as",
    "exporter",
    "observation_domain",
    "format",
    "sampling_interval",
    "sampling_provenance",
]
FIELDS = [IE(8, 4), IE(12, 4), IE(7, 2), IE(11, 2), IE(4, 1), IE(2, 4), IE(1, 4)]
VALUES = [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 1, 2, 17, 3, 300]


def v5_datagram() -> bytes:
    head = struct.pack("!HHIIIIBBH", 5, 1, 1000, 1_700_000_000, 0, 1, 0, 0, (1 << 14) | 10)
    rec = struct.pack(
        "!IIIHHIIIIHHBBBBHHBBH",
        0xC0000201,
        0xC0000202,
        0,
        0,
        0,
        4,
        400,
        900,
        950,
        5,
        6,
        0,
        0x12,
        6,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    return head + rec


def mixed_capture(tmp_path: Path) -> Path:
    """All four formats to the same port, plus one datagram that is none of them."""
    sflow = sflow_datagram(
        [
            sflow_flow_sample(
                [
                    sflow_raw_header(
                        ethernet(
                            ipv4("198.51.100.1", "198.51.100.2", 6, tcp(80, 81, 0x02)), 0x0800
                        ),
                        frame_length=64,
                    )
                ],
                rate=500,
            )
        ]
    )
    payloads = [
        v5_datagram(),
        v9_packet([flowset(0, v9_template(256, FIELDS)), flowset(256, record(FIELDS, VALUES))]),
        ipfix_message(
            [flowset(2, ipfix_template(256, FIELDS)), flowset(256, record(FIELDS, VALUES))]
        ),
        sflow,
        b"\x00\x07garbage",
    ]
    frames = [
        (1_700_000_000.0 + i, udp_frame("192.0.2.200", "192.0.2.1", 5000, 6000, p))
        for i, p in enumerate(payloads)
    ]
    path = tmp_path / "mixed.pcap"
    path.write_bytes(pcap_file(frames))
    return path


def test_json_lines_have_exactly_the_record_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_decode.main([str(mixed_capture(tmp_path)), "--json", "--port", "6000"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["format"] for line in lines] == ["netflow-v5", "netflow-v9", "ipfix", "sflow-v5"]
    # The record's keys, times in RFC 3339 (every command's JSON, #11) with the ms beside them.
    timed = [k for f in FlowRecord.__dataclass_fields__ for k in (
        (f, f + "_ms") if f in ("first", "last") else (f,))]  # fmt: skip
    for line in lines:
        assert list(line) == timed
        assert [k for k in line if not k.endswith("_ms")] == KEYS
    assert lines[0]["first"] == "2023-11-14T22:13:19.900Z" and isinstance(lines[0]["first_ms"], int)
    assert lines[0]["sampling_interval"] == 10 and lines[0]["sampling_provenance"] == "announced"
    assert lines[3]["packets"] == 1 and lines[3]["sampling_interval"] == 500
    assert "datagrams=5 records=4 malformed=1" in err
    assert "malformed[unknown/unsupported]=1" in err


def test_people_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_decode.main([str(mixed_capture(tmp_path))]) == 0
    out, _ = capsys.readouterr()
    first = out.splitlines()[0]
    assert first.startswith("2023-11-14T22:13:19.900Z 192.0.2.1:5 > 192.0.2.2:6 tcp ...A..S. ")
    assert "pkts=4 bytes=400" in first and "1:10(announced)" in first


def test_sampling_override_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(mixed_capture(tmp_path))
    assert cmd_decode.main([path, "--json", "--sampling-override", "192.0.2.200=64"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(x["sampling_interval"], x["sampling_provenance"]) for x in lines} == {
        (64, "overridden")
    }
    assert cmd_decode.main([path, "--sampling-override", "nonsense"]) == 1
    assert capsys.readouterr().err.startswith("overflowd: error: --sampling-override")


def test_our_errors_are_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_decode.main([str(tmp_path / "missing.pcap")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("overflowd: error: cannot read")
    text = tmp_path / "notes.txt"
    text.write_text("not a capture at all\n")
    assert cmd_decode.main([str(text)]) == 1
    err = capsys.readouterr().err
    assert err == f"overflowd: error: {text}: pcap at byte 0: not a pcap or pcapng file\n"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cmd_decode.main([str(tmp_path), "--port", "70000"])
    assert info.value.code == 2


def test_node_entry_point_runs_decode(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "overflowd.cli.node",
            "decode",
            str(mixed_capture(tmp_path)),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 4
    assert "records=4" in done.stderr


def test_broken_pipe_is_quiet(tmp_path: Path) -> None:
    big = tmp_path / "big.pcap"
    frames = [
        (1.0 + i, udp_frame("192.0.2.9", "192.0.2.1", 1, 2055, v5_datagram())) for i in range(3000)
    ]
    big.write_bytes(pcap_file(frames))
    cmd = f"{sys.executable} -m overflowd.cli.cmd_decode {big} | head -1"
    done = subprocess.run(
        ["sh", "-c", cmd], capture_output=True, text=True, timeout=120, check=False
    )
    assert len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_rows_and_records_agree_for_every_format(tmp_path: Path) -> None:
    from overflowd.errors import DecodeError
    from overflowd.flows import FlowRow
    from overflowd.wire import CaptureReader, DecoderState, decode_datagram, decode_datagram_rows

    data = mixed_capture(tmp_path).read_bytes()
    records: list[FlowRecord] = []
    rows: list[FlowRow] = []
    by_records, by_rows = DecoderState(), DecoderState()
    for d in CaptureReader().udp_datagrams(data):
        for state, out, decode in (
            (by_records, records, decode_datagram),
            (by_rows, rows, decode_datagram_rows),
        ):
            try:
                out += decode(d.payload, d.src, state, d.timestamp)  # type: ignore[operator]
            except DecodeError:  # the garbage datagram: both refuse it
                pass
    assert len(rows) == len(records) == 4
    assert all(isinstance(row, FlowRow) for row in rows)
    assert [FlowRecord.from_row(row) for row in rows] == records
    assert [row.to_record() for row in rows] == records
    assert by_rows.statistics() == by_records.statistics()
