"""Any bytes given to the datagram decoder give a report or our DecodeError, never anything else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.errors import DecodeError, SignatureError
from overflowd.identity import verify_report
from overflowd.wire import datagram
from tests.fuzz.test_report_fuzz import IDENTITY, payloads

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode(data: bytes) -> rpt.UnverifiedReport | None:
    try:
        return datagram.decode(data)
    except DecodeError:
        return None


@SETTINGS
@given(st.binary(max_size=1400))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    _decode(data)


@SETTINGS
@given(st.binary(max_size=1300))
def test_any_bytes_behind_the_magic_decode_or_raise_decode_error(data: bytes) -> None:
    out = _decode(datagram.MAGIC + data)
    if out is not None:
        assert out.cose == data
        assert len(data) <= rpt.MAX_REPORT_BYTES


@settings(SETTINGS, max_examples=100)
@given(payloads())
def test_valid_datagram_truncated_at_every_offset(payload: rpt.Payload) -> None:
    wire = datagram.to_wire(IDENTITY.sign_report(payload).cose)
    assert len(wire) <= datagram.MAX_DATAGRAM_BYTES
    assert _decode(wire) is not None
    for cut in range(len(wire)):
        assert _decode(wire[:cut]) is None, cut


@SETTINGS
@given(payloads(), st.data())
def test_mutated_datagrams_never_verify(payload: rpt.Payload, data: st.DataObject) -> None:
    original = datagram.to_wire(IDENTITY.sign_report(payload).cose)
    wire = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    wire += data.draw(st.binary(max_size=8))
    out = _decode(bytes(wire))
    if out is None:
        return
    try:
        verified = verify_report(out.cose)
    except (DecodeError, SignatureError):
        return
    # Only an unchanged datagram verifies (a mutation may write back the same byte).
    assert bytes(wire) == original
    assert verified.payload == payload
