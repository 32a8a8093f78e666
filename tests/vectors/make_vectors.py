"""Print the protocol test vectors (docs/protocol.md embeds this output; tests compare)."""

from __future__ import annotations

import ipaddress
import json

from overflowd import report as rpt
from overflowd.identity import NodeIdentity

SEED = bytes(range(32))

VECTORS = {
    "ipv4-flow-seen": rpt.Payload(
        kind="flow-seen",
        nonce=bytes(range(0xA0, 0xB0)),
        time=1700000000123,
        observer=rpt.Observer(contacts=("mailto:abuse@example.net",), point="edge-1"),
        flow=rpt.Flow(
            src=ipaddress.IPv4Address("192.0.2.10"),
            dst=ipaddress.IPv4Address("198.51.100.20"),
            sport=123,
            dport=44321,
            proto=17,
            packets=120000,
            bytes=56160000,
            first=1699999990000,
            last=1699999999999,
            tcp_flags=0,
            tos=0,
            src_as=64496,
            dst_as=64511,
        ),
        sampling=rpt.Sampling(
            probability=0.125, format="netflow-v5", interval=1, provenance="assumed"
        ),
    ),
    "ipv6-three-contacts": rpt.Payload(
        kind="flow-suspect",
        nonce=bytes(16),
        time=1700000000000,
        observer=rpt.Observer(
            contacts=(
                "mailto:abuse@example.net",
                "https://example.net/abuse",
                "tel:+1-555-0100",
            ),
            point="",
        ),
        flow=rpt.Flow(
            src=ipaddress.IPv6Address("2001:db8::1"),
            dst=ipaddress.IPv6Address("2001:db8:ffff::2"),
            sport=40000,
            dport=443,
            proto=6,
            packets=3,
            bytes=180,
            first=1699999999000,
            last=1699999999500,
            tcp_flags=0x02,
            tos=0,
        ),
        sampling=rpt.Sampling(
            probability=1.0, format="ipfix", interval=1000, provenance="announced"
        ),
    ),
}


def vectors() -> dict[str, dict[str, str]]:
    identity = NodeIdentity(seed=SEED)
    out = {}
    for name, payload in VECTORS.items():
        signed = identity.sign_report(payload)
        out[name] = {
            "payload_cbor_hex": rpt.encode_payload(payload).hex(),
            "cose_hex": signed.cose.hex(),
            "report_id": signed.report_id,
        }
    return out


if __name__ == "__main__":
    identity = NodeIdentity(seed=SEED)
    print(
        json.dumps(
            {
                "seed_hex": SEED.hex(),
                "public_key_hex": identity.public_key.hex(),
                "vectors": vectors(),
            },
            indent=2,
        )
    )
