"""`overflowd run` reports NetFlow v9 and IPFIX records decoded on the array path exactly as
the scalar decoder reads them: softflowd-like datagrams (templates once, then datagrams of
data sets only, the plain fast case) at rate 1, every record reported, each report's flow
equal to the record ``decode_datagram_rows`` gives, and a malformed datagram among them
counted, not fatal."""

from __future__ import annotations

from pathlib import Path

from overflowd.store import Store, default_url
from overflowd.wire import DecoderState, decode_datagram_rows
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.trace import send_udp, trace_payloads
from tests.unit.test_template_batch import reexport

DATAGRAMS = 40


def test_v9_and_ipfix_records_are_reported_as_the_scalar_decoder_reads_them(
    tmp_path: Path,
) -> None:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    v5 = [(p, "127.0.0.1", 0.0) for p in trace_payloads()[:DATAGRAMS]]
    payloads = [d for fmt in ("v9", "ipfix-ms") for d, _, _ in reexport(v5, fmt)]
    state = DecoderState()
    expected = sorted(
        (str(r.src), str(r.dst), r.sport, r.dport, r.proto, r.packets, r.bytes, r.first, r.last,
         r.format)
        for p in payloads
        for r in decode_datagram_rows(p, "127.0.0.1", state, 0.0)
        if r.packets > 0
    )  # fmt: skip
    records = state.statistics().records
    assert len(expected) > 500
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    try:
        assert daemon.udp is not None
        send_udp(payloads[:DATAGRAMS], daemon.udp)
        send_udp([payloads[3][:60]], daemon.udp)  # a data set cut short: the flowset fails
        send_udp(payloads[DATAGRAMS:], daemon.udp)
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
    got = sorted(
        (str(r.src), str(r.dst), r.sport, r.dport, r.proto, r.packets, r.bytes, r.first_ms,
         r.last_ms, r.sampling_format)
        for r in reports
    )  # fmt: skip
    assert got == expected
