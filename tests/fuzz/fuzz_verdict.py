"""Fuzz target for ratelock verdicts: ``python tests/fuzz/fuzz_verdict.py [atheris args]``.

With atheris installed it runs coverage-guided; without, it runs the hypothesis property.
The invariant: any input either verifies or raises a VerdictError (VerdictDecodeError for
anything malformed), never anything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

from overflowd.errors import VerdictError
from overflowd.identity import NodeIdentity, check_signature
from ratelock import verdict as vd

NODE = NodeIdentity(seed=b"\x09" * 32)


def one_input(data: bytes) -> None:
    try:
        vd.verify_verdict(
            data, check_signature, public_key=NODE.public_key, nonce=b"\x01" * 24, now_ms=0,
            token=vd.token_digest("rl1_fuzz"), request=vd.body_digest(b""),
        )
    except VerdictError:
        pass


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        # Run as a script, sys.path starts at tests/fuzz: the repository root holds `tests`.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.fuzz.test_ratelock_verdict_fuzz import (
            test_any_bytes_decode_or_raise_decode_error,
        )

        test_any_bytes_decode_or_raise_decode_error()
        print("atheris not installed; ran the hypothesis property instead")
        return
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
