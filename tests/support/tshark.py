"""tshark as the independent NetFlow/IPFIX decoder for differential tests.

Runs ``tshark -r FILE -d udp.port==PORT,cflow -T json`` and flattens its tree into one dict per
flow record with plain Python values, plus the header fields of the datagram it came in
(exporter address, sysUpTime, export time, engine, sampling). tshark missing is an error for
the caller to turn into a test *failure* (the differential test is the proof the issue asks
for, not an optional extra).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

TIMEOUT_S = 300.0


class TsharkUnavailable(RuntimeError):
    """tshark is not installed or does not run."""


@dataclass(frozen=True)
class TsharkDecode:
    #: One dict per flow record, in capture order (keys: see `_record`).
    records: list[dict[str, Any]]
    #: Frames tshark decoded as cflow.
    frames: int
    #: tshark said the file was cut short in the middle of a packet.
    truncated: bool
    stderr: str = field(repr=False, default="")


def tshark_path() -> str:
    path = shutil.which("tshark")
    if path is None:
        raise TsharkUnavailable(
            "tshark is not installed: the differential tests need it "
            "(Debian: DEBIAN_FRONTEND=noninteractive apt-get install -y tshark)"
        )
    return path


def version() -> str:
    done = subprocess.run(
        [tshark_path(), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def _ms(seconds: str) -> int:
    """tshark's "1325838.498000000" (seconds, nanosecond digits) as integer milliseconds."""
    return int(Decimal(seconds) * 1000)


def _int(text: str) -> int:
    return int(text, 0)  # tshark writes flags and ToS in hex ("0x1b")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _first(value: Any) -> str:
    return str(value[0] if isinstance(value, list) else value)


def _record(pdu: dict[str, Any], header: dict[str, Any], frame: dict[str, Any]) -> dict[str, Any]:
    times = pdu.get("cflow.timedelta_tree", {})
    flat = {k: _first(v) for k, v in pdu.items() if not isinstance(v, dict)}
    record: dict[str, Any] = {
        "frame": frame["number"],
        "exporter": frame["exporter"],
        "src": flat.get("cflow.srcaddr") or flat.get("cflow.srcaddrv6"),
        "dst": flat.get("cflow.dstaddr") or flat.get("cflow.dstaddrv6"),
        "sport": _int(flat.get("cflow.srcport", "0")),
        "dport": _int(flat.get("cflow.dstport", "0")),
        "proto": _int(flat["cflow.protocol"]),
        "packets": _int(flat.get("cflow.packets", flat.get("cflow.packets64", "0"))),
        "bytes": _int(flat.get("cflow.octets", flat.get("cflow.octets64", "0"))),
        "tcp_flags": _int(flat.get("cflow.tcpflags", "0")),
        "tos": _int(flat.get("cflow.tos", "0")),
        "src_as": _int(flat["cflow.srcas"]) if "cflow.srcas" in flat else None,
        "dst_as": _int(flat["cflow.dstas"]) if "cflow.dstas" in flat else None,
    }
    if "cflow.timestart" in times:
        record["start_uptime_ms"] = _ms(_first(times["cflow.timestart"]))
        record["end_uptime_ms"] = _ms(_first(times["cflow.timeend"]))
    record.update(header)
    return record


def frames_json(pcap: Path | str, port: int, dissector: str) -> list[dict[str, Any]]:
    """tshark's whole JSON tree per frame, datagrams to ``port`` decoded as ``dissector``."""
    done = subprocess.run(
        [
            tshark_path(),
            "-r",
            str(pcap),
            "-n",
            "-d",
            f"udp.port=={port},{dissector}",
            "-T",
            "json",
            "--no-duplicate-keys",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise TsharkUnavailable(f"tshark failed ({done.returncode}): {done.stderr.strip()}")
    frames: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return frames


def find_values(tree: Any, key: str) -> list[str]:
    """Every value of ``key`` anywhere in a tshark JSON tree, in document order."""
    found: list[str] = []
    for node in _walk(tree):
        if key in node:
            value = node[key]
            found.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return found


#: Per-record fields for the fast path, and the name each gets in a record dict.
_RECORD_FIELDS = {
    "cflow.srcaddr": "src",
    "cflow.dstaddr": "dst",
    "cflow.srcport": "sport",
    "cflow.dstport": "dport",
    "cflow.protocol": "proto",
    "cflow.packets": "packets",
    "cflow.octets": "bytes",
    "cflow.tcpflags": "tcp_flags",
    "cflow.tos": "tos",
    "cflow.srcas": "src_as",
    "cflow.dstas": "dst_as",
    "cflow.timestart": "start_uptime_ms",
    "cflow.timeend": "end_uptime_ms",
}
#: Per-datagram fields (one occurrence per frame).
_HEADER_FIELDS = {
    "cflow.version": "version",
    "cflow.sysuptime": "sysuptime_ms",
    "cflow.unix_secs": "unix_secs",
    "cflow.unix_nsecs": "unix_nsecs",
    "cflow.engine_type": "engine_type",
    "cflow.engine_id": "engine_id",
    "cflow.samplingmode": "samplingmode",
    "cflow.samplerate": "samplerate",
}
_TIMES = {"start_uptime_ms", "end_uptime_ms", "sysuptime_ms"}


def _run(pcap: Path | str, port: int, output: list[str]) -> tuple[str, str, bool]:
    done = subprocess.run(
        [
            tshark_path(),
            "-r",
            str(pcap),
            "-n",
            "-d",
            f"udp.port=={port},cflow",
            "-Y",
            "cflow",
            *output,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    truncated = "cut short in the middle of a packet" in done.stderr
    # tshark exits 2 after reporting a truncated file; anything else non-zero is a failure.
    if done.returncode != 0 and not (done.returncode == 2 and truncated):
        raise TsharkUnavailable(f"tshark failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout, done.stderr, truncated


def _cflow_fields(pcap: Path | str, port: int) -> TsharkDecode | None:
    """The fast path: ``-T fields``, every occurrence of each field per frame.

    Records are the i-th occurrences of every record field; if any frame has fields whose
    counts differ (a v9 template without AS numbers, IPv4 and IPv6 records mixed), the
    columns cannot be aligned and None sends the caller to the JSON path.
    """
    names = ["frame.number", "ip.src", *_HEADER_FIELDS, *_RECORD_FIELDS]
    output = ["-T", "fields", "-E", "occurrence=a", "-E", "aggregator=|", "-E", "separator=\t"]
    for name in names:
        output += ["-e", name]
    stdout, stderr, truncated = _run(pcap, port, output)
    records: list[dict[str, Any]] = []
    frames = 0
    for line in stdout.splitlines():
        columns = [c.split("|") if c else [] for c in line.split("\t")]
        if len(columns) != len(names):
            return None
        frames += 1
        by_name = dict(zip(names, columns, strict=True))
        header: dict[str, Any] = {}
        for name, key in _HEADER_FIELDS.items():
            values = by_name[name]
            if len(values) > 1:
                return None  # several PDUs in one frame
            if values:
                header[key] = _ms(values[0]) if key in _TIMES else _int(values[0])
        counts = {len(by_name[name]) for name in _RECORD_FIELDS}
        if len(counts) != 1:
            return None
        for i in range(counts.pop()):
            record: dict[str, Any] = {
                "frame": int(by_name["frame.number"][0]),
                "exporter": by_name["ip.src"][0],
            }
            for name, key in _RECORD_FIELDS.items():
                value = by_name[name][i]
                if key in ("src", "dst"):
                    record[key] = value
                elif key in _TIMES:
                    record[key] = _ms(value)
                else:
                    record[key] = _int(value)
            record.update(header)
            records.append(record)
    return TsharkDecode(records, frames, truncated, stderr)


def cflow_records(pcap: Path | str, port: int) -> TsharkDecode:
    """Every NetFlow/IPFIX flow record tshark decodes from datagrams to ``port``.

    Each record: frame, exporter, src, dst, sport, dport, proto, packets, bytes, tcp_flags,
    tos, src_as, dst_as (None when absent), start/end_uptime_ms when the format has them, and
    the datagram's header fields (version, sysuptime_ms, unix_secs, unix_nsecs, engine_type,
    engine_id, samplingmode, samplerate) when present.
    """
    fast = _cflow_fields(pcap, port)
    return fast if fast is not None else _cflow_json(pcap, port)


def _cflow_json(pcap: Path | str, port: int) -> TsharkDecode:
    """The general path: tshark's JSON tree, records found wherever they nest."""
    stdout, stderr, truncated = _run(
        pcap, port, ["-T", "json", "-J", "frame ip ipv6 udp cflow", "--no-duplicate-keys"]
    )
    frames: list[dict[str, Any]] = json.loads(stdout or "[]")
    records: list[dict[str, Any]] = []
    for frame in frames:
        layers = frame["_source"]["layers"]
        ip = layers.get("ip") or layers.get("ipv6") or {}
        info = {
            "number": int(_first(layers["frame"]["frame.number"])),
            "exporter": _first(ip.get("ip.src") or ip.get("ipv6.src")),
        }
        cflows = layers["cflow"]
        for cflow in cflows if isinstance(cflows, list) else [cflows]:
            header: dict[str, Any] = {"version": _int(_first(cflow["cflow.version"]))}
            if "cflow.sysuptime" in cflow:
                header["sysuptime_ms"] = _ms(_first(cflow["cflow.sysuptime"]))
            stamp = cflow.get("cflow.timestamp_tree", {})
            if "cflow.unix_secs" in stamp:
                header["unix_secs"] = _int(_first(stamp["cflow.unix_secs"]))
                header["unix_nsecs"] = _int(_first(stamp.get("cflow.unix_nsecs", "0")))
            for key in ("engine_type", "engine_id", "samplingmode", "samplerate"):
                if f"cflow.{key}" in cflow:
                    header[key] = _int(_first(cflow[f"cflow.{key}"]))
            for node in _walk(cflow):
                if "cflow.srcaddr" in node or "cflow.srcaddrv6" in node:
                    records.append(_record(node, header, info))
    return TsharkDecode(records, len(frames), truncated, stderr)
