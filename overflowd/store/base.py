"""What the store's readers share without SQLAlchemy: the report filter, column bounds, the
embedded database's URL and how an observer is named.

:mod:`overflowd.store.query` (SQLAlchemy, both backends) and :mod:`overflowd.store.fastread`
(stdlib ``sqlite3``, the query CLI's read path on SQLite) answer the same questions from these;
``overflowd-query reports`` on SQLite imports this and never SQLAlchemy (issue #16: start-up).
It must never import SQLAlchemy, a driver or anything that opens a socket.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from overflowd import report as rpt
from overflowd.errors import ReportDecodeError, StoreError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The largest value a BIGINT column holds; u64 protocol fields saturate here.
BIGINT_MAX = 2**63 - 1

#: Trust labels from low to high. ``min_trust`` keeps reports that arrived with that label or a
#: higher one; our own reports (``via = 'local'``, no label) pass any. ``unknown`` is the lowest,
#: so ``min_trust='unknown'`` keeps everything, also reports stored before labels existed.
TRUST_ORDER = ("unknown", "continuity", "dns", "pinned")

#: The longest fingerprint prefix people type: the whole fingerprint (16 hex digits and dashes).
_FINGERPRINT = re.compile(r"[0-9a-f]{1,4}(-[0-9a-f]{1,4}){0,3}")
#: The shortest fingerprint prefix accepted: fewer digits match too many keys to mean one.
MIN_FINGERPRINT_DIGITS = 4
#: Observer keys in one filter: each is a bound parameter (SQLite allows 32,766 per statement).
MAX_FILTER_OBSERVERS = 1000


def default_url(home: Path) -> str:
    """The embedded database of a node whose home directory is ``home``.

    ``%``, ``?`` and ``#`` in the path are escaped: SQLAlchemy reads ``?`` as the start of the
    URL's options and unescapes ``%XX``, so a home named ``a?b`` would otherwise open ``a``.
    """
    path = str(Path(home).expanduser().resolve() / "overflowd.db")
    escaped = path.replace("%", "%25").replace("?", "%3F").replace("#", "%23")
    return f"sqlite:///{escaped}"


def stored_signed_report(report_id: str, cose: bytes) -> rpt.SignedReport:
    """A stored report's bytes decoded again, as the :class:`SignedReport` that was stored.

    The signature is not checked again: only verified reports are ever stored. StoreError when
    the bytes no longer decode (the database was changed under us).
    """
    try:
        unverified = rpt.decode_unverified(cose)
    except ReportDecodeError as exc:
        raise StoreError(f"stored report {report_id} no longer decodes: {exc}") from exc
    return rpt.SignedReport(
        cose=unverified.cose, observer_key=unverified.kid, payload=unverified.payload
    )


# ---------------------------------------------------------------------------------------------
# The filter


@dataclass(frozen=True)
class ReportFilter:
    """Which reports a question is about; every field left at its default matches all."""

    #: the flow's last packet at or after this (ms since the epoch): "traffic since"
    since_ms: int | None = None
    #: the flow's first packet at or before this
    until_ms: int | None = None
    #: arrival at this node (``received_ms``), at or after / at or before
    received_since_ms: int | None = None
    received_until_ms: int | None = None
    src: Network | None = None
    dst: Network | None = None
    #: source or destination in it (a network's own view; peers)
    either: Network | None = None
    proto: int | None = None
    #: source or destination port
    port: int | None = None
    sport: int | None = None
    dport: int | None = None
    kind: str | None = None
    #: 32-byte observer keys; empty: any observer
    observers: tuple[bytes, ...] = ()
    #: one of TRUST_ORDER
    min_trust: str | None = None

    def __post_init__(self) -> None:
        for name in ("since_ms", "until_ms", "received_since_ms", "received_until_ms"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= BIGINT_MAX:
                raise ValueError(f"{name} must be 0 to {BIGINT_MAX}, not {value}")
        for name, top_value in (
            ("proto", 255),
            ("port", 65535),
            ("sport", 65535),
            ("dport", 65535),
        ):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= top_value:
                raise ValueError(f"{name} must be 0 to {top_value}, not {value}")
        for name in ("src", "dst", "either"):
            net = getattr(self, name)
            if net is not None and not isinstance(
                net, ipaddress.IPv4Network | ipaddress.IPv6Network
            ):
                raise TypeError(f"{name} must be an IPv4Network or IPv6Network")
        if len(self.observers) > MAX_FILTER_OBSERVERS:
            raise ValueError(f"at most {MAX_FILTER_OBSERVERS} observers in one filter")
        for key in self.observers:
            if len(key) != 32:
                raise ValueError(f"an observer key is 32 bytes, not {len(key)}")
        if self.min_trust is not None and self.min_trust not in TRUST_ORDER:
            raise ValueError(f"min_trust must be one of {', '.join(TRUST_ORDER)}")


# ---------------------------------------------------------------------------------------------
# Observers


def resolve_observer_with(
    text: str, lookup: Callable[[str, int], Sequence[tuple[bytes, str]]], store_name: str
) -> tuple[bytes, ...]:
    """The observer keys ``text`` names: a key in base64 (standard or url-safe, 32 bytes) or a
    fingerprint (``1a2b-3c4d-...``), whole or a prefix of at least 4 digits naming one key.

    ``lookup(prefix, limit)`` returns up to ``limit`` ``(key, fingerprint)`` rows of the store's
    observers whose fingerprint starts with ``prefix``, ordered by fingerprint then key.
    ValueError with a message for people when it names none, or a prefix names several.
    """
    text = text.strip()
    key = _decode_key(text)
    if key is not None:
        return (key,)
    wanted = text.lower()
    if not _FINGERPRINT.fullmatch(wanted):
        raise ValueError(
            f"observer {text!r}: neither a base64 key (32 bytes) nor a fingerprint like 1a2b-3c4d"
        )
    digits = wanted.replace("-", "")
    if len(digits) < MIN_FINGERPRINT_DIGITS:
        raise ValueError(
            f"observer {text!r}: a fingerprint prefix needs at least "
            f"{MIN_FINGERPRINT_DIGITS} digits"
        )
    rows = lookup(wanted, MAX_FILTER_OBSERVERS + 1)
    if not rows:
        raise ValueError(f"observer {text!r}: no observer with that fingerprint in {store_name}")
    fingerprints = sorted({fp for _, fp in rows})
    if len(fingerprints) > 1:
        shown = ", ".join(fingerprints[:5]) + (", ..." if len(fingerprints) > 5 else "")
        raise ValueError(
            f"observer {text!r}: the prefix matches {len(fingerprints)} observers ({shown}); "
            "give more of the fingerprint"
        )
    return tuple(k for k, _ in rows[:MAX_FILTER_OBSERVERS])


def _decode_key(text: str) -> bytes | None:
    if len(text) < 43 or not re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", text):
        return None
    padded = text + "=" * (-len(text) % 4)
    try:
        if "+" in text or "/" in text:
            key = base64.b64decode(padded, validate=True)
        else:
            key = base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None
