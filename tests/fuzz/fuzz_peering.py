"""Fuzz target for the peer inbox codec: ``python tests/fuzz/fuzz_peering.py [atheris args]``.

With atheris installed it runs coverage-guided over ``decode_inbox`` (JSON and CBOR),
``decode_page`` and ``decode_answer``;
without it, the hypothesis properties of tests/fuzz/test_peering_fuzz.py. The invariant: any
input parses within its caps or raises InboxDecodeError; nothing else escapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz.test_peering_fuzz import (
    one_input,
    test_any_bytes,
    test_any_json,
    test_cbor_mutations,
)


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        test_any_bytes()
        test_any_json()
        test_cbor_mutations()
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
