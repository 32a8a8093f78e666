"""Fuzz target for the flow decoders: ``python tests/fuzz/fuzz_wire.py [atheris args]``.

With atheris installed it runs coverage-guided over ``decode_datagram`` (one decoder state
for the whole run, with small limits, so template and held-data state is fuzzed too) and over
the capture-file reader. Without atheris it runs the hypothesis properties of
tests/fuzz/test_wire_fuzz.py instead.

The invariant: any input gives flow records or raises DecodeError; nothing else escapes, and
the state stays within its limits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from overflowd.errors import DecodeError
from overflowd.wire import CaptureReader, DecoderState, Limits, decode_datagram

LIMITS = Limits(max_templates=64, max_pending_sets=32, max_pending_bytes=64 * 1024)
STATE = DecoderState(limits=LIMITS)


def one_input(data: bytes) -> None:
    # The first byte picks the exporter (state is per exporter) and the target.
    if not data:
        return
    selector, body = data[0], data[1:]
    if selector & 0x80:
        try:
            for datagram in CaptureReader().udp_datagrams(body):
                assert isinstance(datagram.payload, bytes)
        except DecodeError:
            pass
        return
    try:
        for record in decode_datagram(body, f"192.0.2.{selector}", STATE, 1_700_000_000.0):
            record.validate()
    except DecodeError:
        pass
    stats = STATE.statistics()
    assert stats.templates <= LIMITS.max_templates
    assert stats.pending_sets <= LIMITS.max_pending_sets
    assert stats.pending_bytes <= LIMITS.max_pending_bytes


def main() -> None:
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        # Run as a script, sys.path starts at tests/fuzz: the repository root holds `tests`.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.fuzz import test_wire_fuzz as properties

        properties.test_any_bytes_give_records_or_decode_error()
        properties.test_any_bytes_behind_a_known_version()
        properties.test_mutated_datagrams()
        properties.test_one_state_across_hostile_datagrams_stays_bounded()
        properties.test_any_bytes_as_a_capture_file()
        properties.test_mutated_capture_files()
        print("atheris not installed; ran the hypothesis properties instead")
        return
    # Coverage guidance needs the decoders' bytecode instrumented; they were imported above.
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
