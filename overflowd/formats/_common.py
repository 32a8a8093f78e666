"""What the XARF and STIX renderings share: times, protocol names, ids, bounded base64.

Sans-IO like the renderers: no clock, no sockets, no crypto beyond hashlib.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence

from overflowd.errors import OverflowdError
from overflowd.report import MAX_REPORT_BYTES, SignedReport

#: The media type of a COSE message (RFC 9052 §9.1) with its ``cose-type`` parameter; the
#: content *inside* is ``application/overflowd-report+cbor`` (the COSE protected header).
COSE_MEDIA_TYPE = 'application/cose; cose-type="cose-sign1"'

#: Namespace of every UUIDv5 we derive (XARF report ids, STIX SDO ids): fixed forever, so the
#: same reports give the same documents on every node and in every release.
OVERFLOWD_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:overflowd:formats")

#: Largest base64 text of one report we decode from a document: MAX_REPORT_BYTES encoded, so
#: a hostile document cannot make us decode more than one report's worth per evidence item.
MAX_COSE_B64_CHARS = 4 * -(-MAX_REPORT_BYTES // 3)

# Latest instant RFC 3339 (four-digit years) can write: 9999-12-31T23:59:59.999Z.
_MAX_RFC3339_MS = 253_402_300_799_999

#: IANA protocol keywords (www.iana.org/assignments/protocol-numbers) for the numbers flows
#: usually carry; others are written ``ip-proto-N`` where a name is wanted.
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah",
                  58: "ipv6-icmp", 132: "sctp"}  # fmt: skip


class FormatError(OverflowdError, ValueError):
    """Reports that cannot be written in a format, or a document we cannot read back.

    The message names the report id (or the document's part) and the reason, in one line.
    """


def rfc3339_ms(ms: int, what: str) -> str:
    """Unix milliseconds as RFC 3339 UTC (``...T..:..:...mmmZ``); FormatError past year 9999.

    ``report.iso_ms`` falls back to the bare number for such times, which both schemas refuse;
    a signed report may carry any 64-bit time, so the renderers say so instead.
    """
    if not 0 <= ms <= _MAX_RFC3339_MS:
        raise FormatError(f"{what}: time {ms} ms is outside what RFC 3339 can write")
    t = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def flow_span(reports: Iterable[SignedReport]) -> tuple[int, int]:
    """First and last millisecond over the flows; robust to a record with first > last."""
    times = [t for r in reports for t in (r.payload.flow.first, r.payload.flow.last)]
    return min(times), max(times)


def protocol_name(proto: int) -> str:
    return PROTOCOL_NAMES.get(proto, f"ip-proto-{proto}")


def unique_reports(reports: Sequence[SignedReport]) -> list[SignedReport]:
    """The reports once each (by report id), in a stable order: flow start, then id."""
    seen: dict[str, SignedReport] = {}
    for report in reports:
        if not isinstance(report, SignedReport):
            raise TypeError("reports must be overflowd.report.SignedReport values")
        seen.setdefault(report.report_id, report)
    return sorted(seen.values(), key=lambda r: (r.payload.flow.first, r.report_id))


def uuid5(*parts: str) -> str:
    return str(uuid.uuid5(OVERFLOWD_NS, "\x1f".join(parts)))


def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no spaces: what STIX 2.1 §2.9 hashes for an SCO's UUIDv5."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_cose_b64(text: object, where: str, sha256_hex: str | None) -> bytes:
    """One report's bytes from standard base64, bounded, and checked against its hash if any."""
    if not isinstance(text, str):
        raise FormatError(f"{where}: payload must be a base64 string")
    if len(text) > MAX_COSE_B64_CHARS:
        raise FormatError(f"{where}: payload is longer than one report ({MAX_REPORT_BYTES} bytes)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{where}: payload is not base64") from None
    if sha256_hex is not None and hashlib.sha256(data).hexdigest() != sha256_hex.lower():
        raise FormatError(f"{where}: payload does not match its SHA-256")
    return data
