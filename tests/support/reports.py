"""Report payloads for tests: valid by construction, varied by hypothesis where asked."""

from __future__ import annotations

import ipaddress
import secrets

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
