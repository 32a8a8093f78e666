"""The in-band datagram envelope: magic, size bound, and what is refused with which code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from overflowd import report as rpt
from overflowd.errors import DecodeError, ReportDecodeError, SignatureError
from overflowd.identity import NodeIdentity, verify_report
from overflowd.wire import datagram
from overflowd.wire.reader import TruncatedError, WireDecodeError
from tests.support.reports import make_payload

IDENTITY = NodeIdentity(seed=bytes(range(32)))
PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _cose() -> bytes:
    return IDENTITY.sign_report(make_payload()).cose


def test_magic_is_ovf_version_1_and_limits_add_up() -> None:
    assert bytes.fromhex("4f564601") == datagram.MAGIC
    assert len(datagram.MAGIC) + rpt.MAX_REPORT_BYTES == datagram.MAX_DATAGRAM_BYTES == 1200


def test_round_trip() -> None:
    cose = _cose()
    wire = datagram.to_wire(cose)
    assert wire == datagram.MAGIC + cose
    assert datagram.from_wire(wire) == cose
    unverified = datagram.decode(wire)
    assert unverified.cose == cose
    assert verify_report(unverified.cose).report_id == rpt.report_id(cose)


def test_largest_report_fits_exactly_and_one_more_byte_does_not() -> None:
    cose = b"\x00" * rpt.MAX_REPORT_BYTES
    assert len(datagram.to_wire(cose)) == 1200
    with pytest.raises(ValueError):
        datagram.to_wire(cose + b"\x00")
    with pytest.raises(ValueError):
        datagram.to_wire(b"")


@pytest.mark.parametrize(
    ("data", "code", "error"),
    [
        (b"", "truncated", TruncatedError),
        (b"OV", "truncated", TruncatedError),
        (b"OVF\x01", "truncated", TruncatedError),
        (b"XYZ", "bad_magic", datagram.BadMagicError),
        (b"OVF\x02" + b"\xd2" * 10, "bad_magic", datagram.BadMagicError),
        (b"\xd2\x84" + b"\x00" * 100, "bad_magic", datagram.BadMagicError),
        (datagram.MAGIC + b"\x00" * 1197, "oversize", datagram.OversizeError),
        (b"\x00" * 65507, "oversize", datagram.OversizeError),
    ],
)
def test_envelope_refusals_carry_a_stable_code(
    data: bytes, code: str, error: type[WireDecodeError]
) -> None:
    with pytest.raises(error) as info:
        datagram.from_wire(data, sender="192.0.2.9")
    assert info.value.code == code
    assert info.value.fmt == datagram.FORMAT
    assert info.value.exporter == "192.0.2.9"
    assert datagram.reason_of(info.value) == code


def test_a_bare_report_without_magic_is_refused() -> None:
    with pytest.raises(datagram.BadMagicError):
        datagram.decode(_cose())


def test_report_errors_inside_a_good_envelope_are_report_decode_errors() -> None:
    wire = datagram.to_wire(_cose())
    with pytest.raises(ReportDecodeError):
        datagram.decode(wire[:-1])
    with pytest.raises(ReportDecodeError):
        datagram.decode(wire + b"\x00")  # trailing bytes break canonical encoding
    assert datagram.reason_of(ReportDecodeError("x")) == "malformed"


def test_altered_signature_parses_but_does_not_verify() -> None:
    wire = bytearray(datagram.to_wire(_cose()))
    wire[-1] ^= 0x01
    unverified = datagram.decode(bytes(wire))
    with pytest.raises(SignatureError):
        verify_report(unverified.cose)


def test_every_refusal_is_a_decode_error() -> None:
    for data in (b"", b"junk", datagram.MAGIC, datagram.MAGIC + b"\xff", b"\x00" * 2000):
        with pytest.raises(DecodeError):
            datagram.decode(data)


def test_protocol_doc_section_6_matches_the_code() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    match = re.search(r"^## 6\. In-band datagram$(.*?)^## ", text, re.S | re.M)
    assert match, "docs/protocol.md lacks '## 6. In-band datagram'"
    section = match.group(1)
    assert "4f 56 46 01" in section
    assert "1200" in section and "65535" in section
    # The example datagram in §6 is the magic followed by the first test vector's COSE bytes.
    vectors = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    cose = bytes.fromhex(vectors["vectors"]["ipv4-flow-seen"]["cose_hex"])
    example = re.search(r"`(4f564601[0-9a-f]+)…`", section)
    assert example, "§6 shows the start of the example datagram in hex"
    assert datagram.to_wire(cose).hex().startswith(example.group(1))
