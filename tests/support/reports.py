"""Report payloads for tests: valid by construction, varied by hypothesis where asked."""

from __future__ import annotations

import ipaddress
import secrets

from hypothesis import strategies as st

from overflowd import report as rpt


def make_payload(
    src: str = "192.0.2.1",
    dst: str = "198.51.100.2",
    *,
    contacts: tuple[str, ...] = ("mailto:abuse@example.net",),
    packets: int = 1000,
    probability: float = 0.001,
    time_ms: int = 1_700_000_000_000,
) -> rpt.Payload:
    return rpt.Payload(
        kind="flow-seen",
        nonce=secrets.token_bytes(rpt.NONCE_BYTES),
        time=time_ms,
        observer=rpt.Observer(contacts=contacts, point="edge-1"),
        flow=rpt.Flow(
            src=ipaddress.ip_address(src),
            dst=ipaddress.ip_address(dst),
            sport=53,
            dport=40000,
            proto=17,
            packets=packets,
            bytes=min(packets * 512, 2**64 - 1),
            first=time_ms - 10_000,
            last=time_ms - 1,
            tcp_flags=0,
            tos=0,
        ),
        sampling=rpt.Sampling(probability=probability, format="netflow-v5"),
    )


def varied_payloads(*, max_time_ms: int = 2**64 - 1) -> st.SearchStrategy[rpt.Payload]:
    """Payloads across the field ranges the codec allows: IPv4 and IPv6, any port, protocol,
    count (to 2**64 - 1), TCP flags, sampling and times up to ``max_time_ms``."""
    v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
    v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
    ends = st.one_of(st.tuples(v4, v4), st.tuples(v6, v6))
    u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**53, 2**64 - 1]))
    times = st.integers(0, max_time_ms)
    points = st.sampled_from(["", "edge-1"])
    contacts = st.sampled_from(
        [("mailto:abuse@example.net",), ("https://example.net/abuse", "mailto:noc@example.org"), ()]
    )

    @st.composite
    def build(draw: st.DrawFn) -> rpt.Payload:
        src, dst = draw(ends)
        first, last = draw(times), draw(times)
        return rpt.Payload(
            kind=draw(st.sampled_from(["flow-seen", "flood-2"])),
            nonce=draw(st.binary(min_size=rpt.NONCE_BYTES, max_size=rpt.NONCE_BYTES)),
            time=draw(times),
            observer=rpt.Observer(contacts=draw(contacts), point=draw(points)),
            flow=rpt.Flow(
                src=src,
                dst=dst,
                sport=draw(st.integers(0, 65535)),
                dport=draw(st.integers(0, 65535)),
                proto=draw(st.one_of(st.sampled_from([1, 6, 17, 58, 132]), st.integers(0, 255))),
                packets=draw(u64),
                bytes=draw(u64),
                first=first,
                last=last,
                tcp_flags=draw(st.integers(0, 0xFFFF)),
                tos=draw(st.integers(0, 255)),
                src_as=draw(st.none() | st.integers(0, 2**32 - 1)),
            ),
            sampling=rpt.Sampling(
                probability=draw(st.floats(min_value=1e-9, max_value=1.0)),
                format="netflow-v9",
                interval=draw(st.integers(1, 2**32 - 1)),
            ),
        )

    return build()
