"""The report envelope (``rpt.Envelope``, what ``ReportMaker.make`` signs with) writes exactly the
bytes the encoder of commit 9466c00 wrote, and refuses exactly what ``encode_payload`` refuses.

Three encoders are compared on the same payloads: ``_before_*`` below (a frozen copy of the
encoder as it was before the envelope, kept here so that later changes to report.py cannot move
the reference with them), cbor2's canonical encoding of ``payload_to_map`` (independent), and
the envelope, used for whole sequences of payloads so that its per-shape tables are hit,
missed, filled and emptied. Ed25519 is deterministic, so whole COSE_Sign1 messages compare too.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.identity import NodeIdentity, verify_report
from tests.fuzz.test_report_fuzz import loose_payloads, payloads

IDENTITY = NodeIdentity(seed=b"\x09" * 32)
SIGN = IDENTITY.signer()
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the encoder before the envelope (9466c00: overflowd/report.py), verbatim but for names ------


def _before_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


def _before_bstr(data: bytes) -> bytes:
    return _before_head(2, len(data)) + data


def _before_tstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _before_head(3, len(raw)) + raw


_BEFORE_SMALL = tuple(bytes((n,)) if n < 24 else bytes((24, n)) for n in range(256))


def _before_uint(n: int) -> bytes:
    return _BEFORE_SMALL[n] if n < 256 else _before_head(0, n)


def _before_float(x: float) -> bytes:
    for code, fmt in ((0xF9, ">e"), (0xFA, ">f")):
        try:
            packed = struct.pack(fmt, x)
        except OverflowError:
            continue
        if struct.unpack(fmt, packed)[0] == x:
            return bytes((code,)) + packed
    return b"\xfb" + struct.pack(">d", x)


_BK = {
    k: _before_tstr(k)
    for k in (
        "v", "flow", "kind", "time", "nonce", "observer", "sampling", "dst", "src", "tos",
        "last", "bytes", "dport", "first", "proto", "sport", "dst_as", "src_as", "packets",
        "tcp_flags", "point", "contacts", "p", "format", "interval", "provenance",
    )
}  # fmt: skip


def _before_encode_payload(payload: rpt.Payload) -> bytes:
    fl = payload.flow
    k = _BK
    u = _before_uint
    flow_items = 11 + (fl.src_as is not None) + (fl.dst_as is not None)
    flow = [
        _before_head(5, flow_items),
        k["dst"], _before_bstr(fl.dst.packed), k["src"], _before_bstr(fl.src.packed),
        k["tos"], u(fl.tos), k["last"], u(fl.last), k["bytes"], u(fl.bytes),
        k["dport"], u(fl.dport), k["first"], u(fl.first), k["proto"], u(fl.proto),
        k["sport"], u(fl.sport),
    ]  # fmt: skip
    if fl.dst_as is not None:
        flow += (k["dst_as"], u(fl.dst_as))
    if fl.src_as is not None:
        flow += (k["src_as"], u(fl.src_as))
    flow += (k["packets"], u(fl.packets), k["tcp_flags"], u(fl.tcp_flags))
    obs = payload.observer
    observer = [_before_head(5, 2 if obs.point else 1)]
    if obs.point:
        observer += (k["point"], _before_tstr(obs.point))
    contacts = obs.contacts
    observer += (k["contacts"], _before_head(4, len(contacts)), *map(_before_tstr, contacts))
    sm = payload.sampling
    return b"".join((
        b"\xa7", k["v"], u(payload.version),
        k["flow"], *flow,
        k["kind"], _before_tstr(payload.kind),
        k["time"], u(payload.time),
        k["nonce"], _before_bstr(payload.nonce),
        k["observer"], *observer,
        k["sampling"], b"\xa4", k["p"], _before_float(float(sm.probability)),
        k["format"], _before_tstr(sm.format), k["interval"], u(sm.interval),
        k["provenance"], _before_tstr(sm.provenance),
    ))  # fmt: skip


def _before_encode_signed(payload: rpt.Payload, kid: bytes) -> bytes:
    rpt._check_payload(payload)
    protected = bytes(cbor2.dumps({1: -8, 3: rpt.CONTENT_TYPE, 4: kid}, canonical=True))
    payload_bytes = _before_encode_payload(payload)
    to_sign = (
        b"\x84" + bytes(cbor2.dumps("Signature1")) + _before_bstr(protected) + b"\x40"
        + _before_bstr(payload_bytes)
    )  # fmt: skip
    signature = SIGN(to_sign)
    return (
        b"\xd2\x84" + _before_bstr(protected) + b"\xa0" + _before_bstr(payload_bytes)
        + _before_bstr(signature)
    )  # fmt: skip


# -- properties ----------------------------------------------------------------------------------


def _outcome(f: Any, payload: rpt.Payload) -> tuple[str, Any]:
    """The bytes, or the exception's type and message (ValueError, or whatever a payload of
    the wrong types makes the checks raise: the envelope must raise the same)."""
    try:
        return "ok", f(payload)
    except Exception as exc:
        return "refused", f"{type(exc).__name__}: {exc}"


def _replace_observer(payload: rpt.Payload, observer: rpt.Observer) -> rpt.Payload:
    return rpt.Payload(
        payload.kind, payload.nonce, payload.time, observer, payload.flow, payload.sampling,
        payload.version,
    )  # fmt: skip


@SETTINGS
@given(st.lists(payloads(), min_size=1, max_size=6), st.integers(0, 5))
def test_envelope_writes_the_bytes_of_before_and_of_cbor2(
    batch: list[rpt.Payload], observer_index: int
) -> None:
    """One envelope signs a sequence of payloads of its observer: each COSE_Sign1 is the one
    the encoder before wrote, its payload is cbor2's canonical encoding, and it verifies."""
    observer = batch[observer_index % len(batch)].observer
    envelope = rpt.Envelope(IDENTITY.public_key, SIGN, observer)
    for payload in [_replace_observer(p, observer) for p in batch] * 2:  # twice: cache hits
        expected = _before_encode_signed(payload, IDENTITY.public_key)
        assert envelope.sign(payload) == expected
        assert envelope.encode_payload(payload) == rpt._canonical(rpt.payload_to_map(payload))
        assert rpt.encode_signed(payload, IDENTITY.public_key, SIGN) == expected
    assert verify_report(expected).payload == payload


@SETTINGS
@given(st.lists(loose_payloads(), min_size=1, max_size=6))
def test_envelope_refuses_what_encode_payload_refuses_in_its_words(
    batch: list[rpt.Payload],
) -> None:
    """Out-of-range fields, one by one, after valid payloads of the same shape filled the
    envelope's tables: the same bytes or the same ValueError message as encode_payload."""
    envelope = rpt.Envelope(IDENTITY.public_key, SIGN, batch[0].observer)
    for payload in batch:
        assert _outcome(envelope.encode_payload, payload) == _outcome(rpt.encode_payload, payload)


class _Str(str):
    pass


class _Int(int):
    pass


def _good() -> rpt.Payload:
    # fmt: off
    return rpt.Payload(
        kind="flow-seen",
        nonce=b"\x01" * 16,
        time=1_700_000_000_000,
        observer=rpt.Observer(contacts=("mailto:noc@example.net",), point="r1 ge-0/0/0"),
        flow=rpt.Flow(
            src=ipaddress.IPv4Address("192.0.2.1"), dst=ipaddress.IPv4Address("198.51.100.7"),
            sport=40000, dport=443, proto=6, packets=12, bytes=9000, first=1, last=2,
        ),
        sampling=rpt.Sampling(probability=0.001, format="netflow-v5"),
    )
    # fmt: on


def _with(payload: rpt.Payload, **changes: Any) -> rpt.Payload:
    """``payload`` with fields of any of its parts replaced, bypassing nothing (plain init)."""
    flow = {f: getattr(payload.flow, f) for f in rpt.Flow.__slots__}
    sampling = {f: getattr(payload.sampling, f) for f in rpt.Sampling.__slots__}
    top = {f: getattr(payload, f) for f in rpt.Payload.__slots__}
    for name, value in changes.items():
        for part in (flow, sampling, top):
            if name in part:
                part[name] = value
                break
        else:
            raise KeyError(name)
    top["flow"], top["sampling"] = rpt.Flow(**flow), rpt.Sampling(**sampling)
    return rpt.Payload(**top)


ODD_FIELDS = [
    {"version": True}, {"version": 1.0}, {"version": 2}, {"kind": _Str("flow-seen")},
    {"kind": "Flow"}, {"interval": True}, {"interval": _Int(1)}, {"interval": 0},
    {"format": _Str("netflow-v5")}, {"provenance": _Str("assumed")}, {"provenance": "guessed"},
    {"probability": 1}, {"probability": True}, {"probability": 0.0}, {"probability": 1.5},
    {"probability": float("nan")}, {"nonce": bytearray(16)}, {"nonce": b"short"},
    {"time": -1}, {"time": 2**64}, {"time": True}, {"sport": 65536}, {"sport": True},
    {"dport": -1}, {"proto": 256}, {"tos": 300}, {"tcp_flags": 2**16}, {"packets": 2**64},
    {"bytes": _Int(5)}, {"first": -5}, {"last": 1.5}, {"src_as": 2**32}, {"dst_as": -1},
    {"src_as": False}, {"dst": ipaddress.IPv6Address("2001:db8::1")},
    {"src": "192.0.2.1"}, {"observer": None}, {"observer": rpt.Observer(("x" * 600,))},
    {"observer": rpt.Observer(("mailto:noc@example.net",), "r1 ge-0/0/0")},  # equal, not same
    {"src_as": 64500, "dst_as": 64501}, {"dst_as": 0}, {"probability": 1.0},
    {"probability": 5e-324}, {"probability": 0.5}, {"interval": 2**32 - 1},
    {"src": ipaddress.IPv6Address("2001:db8::2"), "dst": ipaddress.IPv6Address("2001:db8::1")},
]  # fmt: skip


@pytest.mark.parametrize("changes", ODD_FIELDS, ids=repr)
def test_odd_field_types_and_values_get_the_verdict_of_encode_payload(
    changes: dict[str, Any],
) -> None:
    """bool for int, int for float, subclasses of str and int, out-of-range values, another
    observer object (equal or not): each after the envelope has seen the valid shape."""
    good = _good()
    envelope = rpt.Envelope(IDENTITY.public_key, SIGN, good.observer)
    assert envelope.encode_payload(good) == rpt.encode_payload(good)  # tables filled
    odd = _with(good, **changes)
    assert _outcome(envelope.encode_payload, odd) == _outcome(rpt.encode_payload, odd)
    before = _outcome(lambda p: _before_encode_signed(p, IDENTITY.public_key), odd)
    assert _outcome(envelope.sign, odd) == before


def test_an_observer_no_report_can_carry_is_refused_with_encode_payloads_message() -> None:
    bad = rpt.Observer(contacts=("a",) * (rpt.MAX_CONTACTS + 1))
    envelope = rpt.Envelope(IDENTITY.public_key, SIGN, bad)
    payload = _with(_good(), observer=bad)
    assert _outcome(envelope.sign, payload)[0] == "refused"
    assert _outcome(envelope.encode_payload, payload) == _outcome(rpt.encode_payload, payload)


@SETTINGS
@given(st.lists(st.integers(1, 2**32 - 1), min_size=1, max_size=40))
@example([1, 2, 3, 1, 2, 3, 4, 5, 1])
def test_shape_tables_stay_bounded_under_many_announced_intervals(intervals: list[int]) -> None:
    """Exporters announce any sampling interval: the tables stay at their bound and every
    report is still the encoder before's bytes."""
    small = 4
    original = rpt.ENVELOPE_SHAPES, rpt.ENVELOPE_FLOATS
    rpt.ENVELOPE_SHAPES, rpt.ENVELOPE_FLOATS = small, small
    try:
        good = _good()
        envelope = rpt.Envelope(IDENTITY.public_key, SIGN, good.observer)
        for i, interval in enumerate(intervals):
            payload = _with(good, interval=interval, probability=1.0 / (1 + i % 7))
            assert envelope.sign(payload) == _before_encode_signed(payload, IDENTITY.public_key)
            assert len(envelope._samplings) <= small and len(envelope._floats) <= small
            assert len(envelope._kinds) <= small
    finally:
        rpt.ENVELOPE_SHAPES, rpt.ENVELOPE_FLOATS = original


@SETTINGS
@given(payloads())
def test_positional_constructors_build_what_the_dataclasses_build(payload: rpt.Payload) -> None:
    """What make() builds with rpt.new_* equals (and hashes as) the dataclasses' own objects,
    stays frozen, and the signed report carries its id."""
    fl, sm = payload.flow, payload.sampling
    flow = rpt.new_flow(*(getattr(fl, f) for f in rpt.Flow.__slots__))
    sampling = rpt.new_sampling(sm.probability, sm.format, sm.interval, sm.provenance)
    built = rpt.new_payload(
        payload.kind, payload.nonce, payload.time, payload.observer, flow, sampling,
        payload.version,
    )  # fmt: skip
    assert (flow, sampling, built) == (fl, sm, payload)
    assert hash(built) == hash(payload) and type(built) is rpt.Payload
    cose = IDENTITY.sign_report(payload).cose
    report = rpt.new_signed_report(cose, IDENTITY.public_key, built)
    assert report == rpt.SignedReport(cose=cose, observer_key=IDENTITY.public_key, payload=payload)
    assert report.report_id == rpt.report_id(cose)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        built.kind = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "change",
    [
        lambda contacts: contacts.append("mailto:" + "x" * 600),  # now too long: refused
        lambda contacts: contacts.__setitem__(0, "mailto:other@example.net"),  # other bytes
        lambda contacts: contacts.append(7),  # not text: refused
    ],
    ids=["too_long", "replaced", "not_text"],
)
def test_an_observer_whose_contacts_change_after_the_envelope_is_encoded_afresh(
    change: Any,
) -> None:
    """Observer is frozen, but its contacts may be any sequence: a list given in place of the
    tuple (a caller building one by hand) can change after the envelope checked and encoded
    it. What is signed must be what the observer holds at signing time, as encode_signed does,
    never the bytes remembered from before, and a no longer valid observer is refused."""
    contacts = ["mailto:noc@example.net"]
    observer = rpt.Observer(contacts=contacts, point="r1")  # type: ignore[arg-type]
    payload = _with(_good(), observer=observer)
    envelope = rpt.Envelope(IDENTITY.public_key, SIGN, observer)
    assert envelope.sign(payload) == _before_encode_signed(payload, IDENTITY.public_key)
    change(contacts)
    before = _outcome(lambda p: _before_encode_signed(p, IDENTITY.public_key), payload)
    assert _outcome(envelope.sign, payload) == before
    assert _outcome(envelope.encode_payload, payload) == _outcome(rpt.encode_payload, payload)


# -- ReportMaker.make (payload built inline) against main's report_payload + the encoder before --


def _before_clamp(value: int, maximum: int, minimum: int = 0) -> int:
    return minimum if value < minimum else maximum if value > maximum else value


def _before_report_payload(record: Any, p: float, observer: rpt.Observer, nonce: bytes,
                           now_ms: int, kind: str) -> rpt.Payload:  # fmt: skip
    """pipeline.report_payload of 9466c00, verbatim but for names."""
    as_number = lambda v: v if v is not None and 0 <= v <= rpt.U32 else None  # noqa: E731
    return rpt.Payload(
        kind=kind, nonce=nonce, time=now_ms, observer=observer,
        flow=rpt.Flow(
            src=record.src, dst=record.dst, sport=record.sport, dport=record.dport,
            proto=record.proto, packets=_before_clamp(record.packets, rpt.U64),
            bytes=_before_clamp(record.bytes, rpt.U64), first=_before_clamp(record.first, rpt.U64),
            last=_before_clamp(record.last, rpt.U64), tcp_flags=record.tcp_flags & 0xFFFF,
            tos=record.tos & 0xFF, src_as=as_number(record.src_as),
            dst_as=as_number(record.dst_as),
        ),
        sampling=rpt.Sampling(
            probability=p, format=record.format[: rpt.MAX_FORMAT_BYTES],
            interval=_before_clamp(record.sampling_interval, rpt.U32, minimum=1),
            provenance=record.sampling_provenance,
        ),
    )  # fmt: skip


_edge_ints = st.one_of(
    st.sampled_from([0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, 2**64,
                     2**70, -1, -(2**64)]),
    st.integers(-(2**66), 2**66),
)  # fmt: skip
_addresses = st.sampled_from([
    "192.0.2.1", "0.0.0.0", "255.255.255.255", "::ffff:192.0.2.1", "2001:db8::1", "::",
    "fe80::1%eth0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
]).map(ipaddress.ip_address)  # fmt: skip


@SETTINGS
@given(
    st.lists(
        st.tuples(
            _addresses,
            _addresses,
            st.integers(0, 65535),
            st.integers(0, 65535),
            st.sampled_from([0, 6, 17, 255]),
            _edge_ints,
            _edge_ints,
            _edge_ints,
            _edge_ints,
            _edge_ints,
            _edge_ints,
            st.one_of(st.none(), _edge_ints),
            st.one_of(st.none(), _edge_ints),
            st.one_of(
                st.sampled_from(["netflow-v5", "ipfix", "", "x" * 30, "é" * 13]),
                st.text(max_size=30),
            ),
            _edge_ints,
            st.sampled_from([*rpt.PROVENANCES, "bogus"]),
            st.one_of(
                st.sampled_from([1.0, 0.5, 5e-324, 1e-6, 0.0, -0.0, 1.5, math.nan, math.inf]),
                st.floats(0.0, 1.0),
            ),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(
        [
            rpt.Observer(),
            rpt.Observer(contacts=("mailto:noc@example.net",), point="r1"),
            rpt.Observer(contacts=("tel:+1", "https://é.example/\u2028"), point="\U0001f600" * 16),
        ]
    ),
)
def test_make_signs_what_report_payload_and_the_encoder_before_signed(
    rows: list[Any], observer: rpt.Observer
) -> None:
    """make() with the edge values exporters send (negative, > u64, > u32 AS numbers and
    intervals, 32-bit TCP flags, long and non-ASCII formats, IPv4-mapped and scoped addresses,
    mixed families, odd probabilities): the same payload, the same COSE bytes, or the same
    ValueError (what make_all counts as unreportable, never raises), row after row."""
    from overflowd.flows import FlowRow
    from overflowd.flowsample import SamplingPolicy
    from overflowd.pipeline import ReportMaker

    maker = ReportMaker(identity=IDENTITY, observer=observer, policy=SamplingPolicy(rate=1.0))
    nonce = b"\x07" * rpt.NONCE_BYTES
    maker.nonce = lambda n: nonce
    for (src, dst, sport, dport, proto, packets, nbytes, first, last, flags, tos, src_as,
         dst_as, fmt, interval, provenance, p) in rows:  # fmt: skip
        record = FlowRow(
            src, dst, sport, dport, proto, packets, nbytes, first, last, flags, tos, src_as,
            dst_as, "192.0.2.9", 0, fmt, interval, provenance,
        )  # fmt: skip
        try:
            got: tuple[str, Any] = ("ok", maker.make(record, p, 1_700_000_000_000))
        except Exception as exc:
            got = ("refused", f"{type(exc).__name__}: {exc}")
        try:
            payload = _before_report_payload(record, p, observer, nonce, 1_700_000_000_000,
                                             maker.kind_of(record))  # fmt: skip
            want = _outcome(lambda pl: _before_encode_signed(pl, IDENTITY.public_key), payload)
        except Exception as exc:
            want = ("refused", f"{type(exc).__name__}: {exc}")
        if got[0] == "ok":
            assert want == ("ok", got[1].cose)
            assert got[1].payload == payload
            assert got[1].report_id == rpt.report_id(got[1].cose)
        else:
            assert got == want
