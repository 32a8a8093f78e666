"""Any bytes given to the report parser parse or raise our decode error, never anything else."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.errors import ReportDecodeError, SignatureError
from overflowd.identity import NodeIdentity, verify_report

IDENTITY = NodeIdentity(seed=b"\x07" * 32)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

addresses_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
addresses_v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def payloads(draw: st.DrawFn) -> rpt.Payload:
    family = draw(st.sampled_from([addresses_v4, addresses_v6]))
    contacts = draw(
        st.lists(
            st.from_regex(r"mailto:[a-z]{1,40}@example\.net", fullmatch=True),
            max_size=rpt.MAX_CONTACTS,
        )
    )
    return rpt.Payload(
        kind=draw(st.from_regex(r"[a-z][a-z0-9-]{0,31}", fullmatch=True)),
        nonce=draw(st.binary(min_size=16, max_size=16)),
        time=draw(u64),
        observer=rpt.Observer(contacts=tuple(contacts), point=draw(st.text(max_size=16))),
        flow=rpt.Flow(
            src=draw(family),
            dst=draw(family),
            sport=draw(st.integers(0, 65535)),
            dport=draw(st.integers(0, 65535)),
            proto=draw(st.integers(0, 255)),
            packets=draw(u64),
            bytes=draw(u64),
            first=draw(u64),
            last=draw(u64),
            tcp_flags=draw(st.integers(0, 65535)),
            tos=draw(st.integers(0, 255)),
            src_as=draw(st.none() | st.integers(0, 2**32 - 1)),
            dst_as=draw(st.none() | st.integers(0, 2**32 - 1)),
        ),
        sampling=rpt.Sampling(
            probability=draw(st.floats(min_value=1e-12, max_value=1.0)),
            format=draw(st.sampled_from(["netflow-v5", "netflow-v9", "ipfix", "sflow-v5"])),
            interval=draw(st.integers(1, 2**32 - 1)),
            provenance=draw(st.sampled_from(rpt.PROVENANCES)),
        ),
    )


@SETTINGS
@given(st.binary(max_size=1400))
def test_any_bytes_parse_or_raise_decode_error(data: bytes) -> None:
    try:
        rpt.decode_unverified(data)
    except ReportDecodeError:
        pass


@SETTINGS
@given(payloads())
def test_every_valid_payload_round_trips_and_fits(payload: rpt.Payload) -> None:
    signed = IDENTITY.sign_report(payload)
    assert len(signed.cose) <= rpt.MAX_REPORT_BYTES
    assert verify_report(signed.cose).payload == payload


@SETTINGS
@given(payloads(), st.data())
def test_mutated_reports_raise_only_our_errors(payload: rpt.Payload, data: st.DataObject) -> None:
    cose = bytearray(IDENTITY.sign_report(payload).cose)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(cose) - 1))
        cose[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(cose)))
    try:
        verify_report(bytes(cose[:cut]))
    except (ReportDecodeError, SignatureError):
        pass


@st.composite
def loose_payloads(draw: st.DrawFn) -> rpt.Payload:
    """Payloads with every field sometimes out of range: for the two validators to disagree on."""
    good = draw(payloads())
    ints = st.integers(-2, 2**64 + 1)
    return rpt.Payload(
        kind=draw(st.sampled_from([good.kind, "Bad Kind", "x" * 40, ""])),
        nonce=draw(st.sampled_from([good.nonce, b"short"])),
        time=draw(st.sampled_from([good.time, -1, 2**64])),
        observer=rpt.Observer(
            contacts=draw(st.sampled_from([good.observer.contacts, ("a",) * 5, ("x" * 600,)])),
            point=draw(st.sampled_from([good.observer.point, "p" * 65])),
        ),
        flow=rpt.Flow(
            src=good.flow.src,
            dst=draw(st.sampled_from([good.flow.dst, good.flow.src])),
            sport=draw(st.one_of(st.just(good.flow.sport), ints)),
            dport=good.flow.dport,
            proto=draw(st.one_of(st.just(good.flow.proto), ints)),
            packets=draw(st.one_of(st.just(good.flow.packets), ints)),
            bytes=good.flow.bytes,
            first=good.flow.first,
            last=good.flow.last,
            tcp_flags=draw(st.one_of(st.just(good.flow.tcp_flags), ints)),
            tos=good.flow.tos,
            src_as=draw(st.one_of(st.just(good.flow.src_as), st.integers(-1, 2**33))),
            dst_as=good.flow.dst_as,
        ),
        sampling=rpt.Sampling(
            probability=draw(st.sampled_from([good.sampling.probability, 0.0, 1.5, 1])),
            format=draw(st.sampled_from([good.sampling.format, "f" * 30])),
            interval=draw(st.sampled_from([good.sampling.interval, 0, 2**32])),
            provenance=draw(st.sampled_from([good.sampling.provenance, "guessed"])),
        ),
    )


@SETTINGS
@given(loose_payloads())
def test_fast_pre_sign_check_agrees_with_the_decoder(payload: rpt.Payload) -> None:
    """encode_payload's field-by-field check refuses exactly what the decoder would refuse."""
    try:
        rpt._payload_from_map(rpt.payload_to_map(payload))
        decoder_ok = True
    except ReportDecodeError:
        decoder_ok = False
    try:
        rpt._check_payload(payload)
        check_ok = True
    except ValueError:
        check_ok = False
    assert check_ok == decoder_ok


@SETTINGS
@given(payloads())
def test_hand_written_encoder_is_cbor2_canonical(payload: rpt.Payload) -> None:
    """The fast payload encoder writes exactly the bytes of RFC 8949 §4.2 deterministic CBOR."""
    assert rpt.encode_payload(payload) == rpt._canonical(rpt.payload_to_map(payload))
