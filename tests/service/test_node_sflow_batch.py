"""`overflowd run` reports sFlow v5 records decoded on the array path exactly as the scalar
decoder reads them: datagrams of the common case (raw Ethernet/IPv4/IPv6 headers, VLAN tags,
counter samples) beside odd ones the scalar path takes (AS numbers, a non-IP first header)
at rate 1, every record reported, each report's flow equal to the record
``decode_datagram_rows`` gives; a malformed datagram among them is counted, not fatal."""

from __future__ import annotations

from pathlib import Path

from overflowd.store import Store, default_url
from overflowd.wire import DecoderState, decode_datagram_rows
from overflowd.wire.sflow_batch import decode_sflow_batch
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.trace import send_udp
from tests.unit.test_sflow_batch import COMMON, V4_TCP, flow, raw
from tests.unit.test_wire_encoder import ethernet, sflow_datagram, sflow_gateway


def payloads() -> list[bytes]:
    arp = ethernet(bytes(28), 0x0806)
    odd = [flow(raw(V4_TCP), sflow_gateway(64500, [1, 2])), flow(raw(arp), raw(V4_TCP))]
    out = []
    for k in range(30):
        samples = [COMMON[(k + j) % len(COMMON)] for j in range(6)]
        if k % 10 == 9:
            samples.append(odd[k % 2])
        agent = "192.0.2.10" if k % 2 else "2001:db8::10"
        out.append(sflow_datagram(samples, agent=agent, sub_agent=k % 3))
    return out


def key(r: object, *names: str) -> tuple[object, ...]:
    return tuple(str(getattr(r, n)) for n in names)


FIELDS = ("src", "dst", "sport", "dport", "proto", "packets", "bytes", "tcp_flags", "tos")


def test_sflow_records_are_reported_as_the_scalar_decoder_reads_them(tmp_path: Path) -> None:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    datagrams = payloads()
    state = DecoderState()
    rows = [r for p in datagrams for r in decode_datagram_rows(p, "127.0.0.1", state, 0.0)]
    expected = sorted((*key(r, *FIELDS), r.sampling_interval) for r in rows)
    records = state.statistics().records
    # The array path takes most of them (else this test would not test it).
    batch = decode_sflow_batch([(p, "127.0.0.1", 0.0) for p in datagrams], DecoderState())
    assert len(batch) > 100 and len(batch.scalar) == 3
    assert {r.src.version for r in rows} == {4, 6}
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    try:
        assert daemon.udp is not None
        send_udp(datagrams[:15], daemon.udp)
        send_udp([datagrams[3][:60]], daemon.udp)  # cut inside its first sample: refused
        send_udp(datagrams[15:], daemon.udp)
        assert daemon.wait_for("overflowd_decoder_records_total", records) == records
        stored = daemon.wait_for("overflowd_reports_stored_total", len(expected), timeout=60)
    finally:
        code, output = daemon.stop()
    assert code == 0, output
    assert stored == len(expected)
    store = Store.open(default_url(home))
    try:
        reports, _ = store.reports_after(0, 10_000)
    finally:
        store.close()
    got = sorted((*key(r, *FIELDS), r.sampling_interval) for r in reports)
    assert got == expected
