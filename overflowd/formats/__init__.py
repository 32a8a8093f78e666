"""Signed reports in the abuse desks' formats: XARF v4 and STIX 2.1 (sans-IO).

Both keep every report's COSE_Sign1 bytes verbatim, so whoever receives the document can
check the observer's signature without trusting the node that wrote it; ``cose_from_xarf``
and ``cose_from_stix`` take them back out. Pure functions over ``SignedReport`` values: no
clock is read (times are the flows' own or passed in), nothing is fetched. docs/formats.md.
"""

from __future__ import annotations

from overflowd.formats._common import COSE_MEDIA_TYPE, FormatError
from overflowd.formats.stix import cose_from_stix, stix_bundle
from overflowd.formats.xarf import cose_from_xarf, unfit_reason, xarf_reports

__all__ = [
    "COSE_MEDIA_TYPE",
    "FormatError",
    "cose_from_stix",
    "cose_from_xarf",
    "stix_bundle",
    "unfit_reason",
    "xarf_reports",
]
