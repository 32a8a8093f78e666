"""Fuzz target for the report parser: ``python tests/fuzz/fuzz_report.py [atheris args]``.

With atheris installed it runs coverage-guided; without, it runs the hypothesis property.
The invariant: any input either parses or raises ReportDecodeError / SignatureError.
"""

from __future__ import annotations

import sys

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
        from tests.fuzz.test_report_fuzz import test_any_bytes_parse_or_raise_decode_error

        test_any_bytes_parse_or_raise_decode_error()
        print("atheris not installed; ran the hypothesis property instead")
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
