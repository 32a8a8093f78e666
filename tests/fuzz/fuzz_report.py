"""Fuzz target for the report parser: ``python tests/fuzz/fuzz_report.py [atheris args]``.

With atheris installed it runs coverage-guided; without, it runs the hypothesis property.
The invariant: any input either parses or raises ReportDecodeError / SignatureError.
"""

from __future__ import annotations

import sys
from pathlib import Path

from overflowd.errors import ReportDecodeError, SignatureError
from overflowd.identity import verify_report


def one_input(data: bytes) -> None:
    try:
        verify_report(data)
    except (ReportDecodeError, SignatureError):
        pass


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        # Run as a script, sys.path starts at tests/fuzz: the repository root holds `tests`.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.fuzz.test_report_fuzz import test_any_bytes_parse_or_raise_decode_error

        test_any_bytes_parse_or_raise_decode_error()
        print("atheris not installed; ran the hypothesis property instead")
        return
    # Coverage guidance needs the parser's bytecode instrumented; it was imported above.
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
