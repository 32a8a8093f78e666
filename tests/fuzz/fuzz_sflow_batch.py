"""Fuzz target for the sFlow array path: ``python tests/fuzz/fuzz_sflow_batch.py [atheris args]``.

With atheris installed it runs coverage-guided over ``decode_sflow_batch``: the input is cut
into datagrams at every ``b"\\xff\\xfe"`` (each given the sFlow v5 version field if it lacks
one, so the walk is what gets fuzzed), decoded as one batch and, separately, datagram by
datagram the scalar way. Without atheris it runs the hypothesis properties of
tests/fuzz/test_sflow_batch_fuzz.py instead.

The invariant: the batch never raises, has no failures, and gives the scalar path's rows,
refusals and state.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.unit.test_sflow_batch import NOW, assert_equivalent

MAGIC = b"\0\0\0\x05"


def one_input(data: bytes) -> None:
    parts = data.split(b"\xff\xfe")[:16]
    stream = [
        (p if p.startswith(MAGIC) else MAGIC + p, f"192.0.2.{i % 3}", NOW + i)
        for i, p in enumerate(parts)
    ]
    assert_equivalent(stream, batch_size=8)


def main() -> None:
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        from tests.fuzz import test_sflow_batch_fuzz as properties

        properties.test_mangled_streams_decode_the_same_either_way()
        properties.test_every_datagram_cut_at_every_offset()
        properties.test_one_hostile_datagram_costs_only_itself()
        print("atheris not installed; ran the hypothesis properties instead")
        return
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
