"""Fuzz target for the ClientHello sniffer: ``python tests/fuzz/fuzz_jfe_sniff.py [atheris args]``.

With atheris installed it runs coverage-guided; without, it runs the hypothesis properties.
The invariant: any input gives a ClientHello, None (need more) or NotTls.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jfe.sniff import MAX_CLIENT_HELLO_BYTES, NotTls, parse_client_hello


def one_input(data: bytes) -> None:
    try:
        out = parse_client_hello(data)
    except NotTls:
        return
    if out is not None:
        assert out.record_bytes <= min(len(data), MAX_CLIENT_HELLO_BYTES)


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.fuzz import test_jfe_sniff_fuzz as props

        props.test_any_bytes()
        props.test_any_bytes_behind_a_handshake_header()
        props.test_mutated_hellos_keep_the_invariant()
        print("atheris not installed; ran the hypothesis properties instead")
        return
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
