"""The questions an abuse desk asks a node, and the JSON of their answers: one shape per row.

``overflowd-query reports|who|top --json`` prints these objects one per line, and the node API
(``GET /v1/reports``, ``/v1/who``, ``/v1/top``) returns the very same objects in its pages, so
``overflowd-query --remote URL`` prints what the API says, byte for byte. The parameters are
parsed here once, too: a flag (``--since 1h``) and a query parameter (``?since=1h``) mean the
same and are refused with the same message, naming the flag (the CLI exits 2, the API says 400).

Times are RFC 3339 UTC with milliseconds everywhere (``first``/``last``), with the Unix
milliseconds beside them (``first_ms``/``last_ms``) for arithmetic.

This module must never read a clock (``now_ms`` is passed in), open a store or a socket.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from overflowd import report as rpt
from overflowd.estimate import GROUP_BY, OTHER, Estimate

if TYPE_CHECKING:
    from overflowd.estimate import GroupKey, TopResult
    from overflowd.store.query import ReportFilter, WhoRow
    from overflowd.store.repository import StoredReport

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Protocol names a person types; any number 0-255 works too.
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "icmp6": 58, "sctp": 132}
PROTO_NAMES = {number: name for name, number in PROTOCOLS.items()}
#: --min-trust's words, lowest first (overflowd.store.query.TRUST_ORDER).
TRUST_LEVELS = ("unknown", "continuity", "dns", "pinned")
#: --prefix-len / ?prefix_len: one number for both families would mean /24 of IPv6; so it is
#: the IPv4 length, and IPv6 groups by v4_len + 24 (24 -> 48, as nfdump's and Akvorado's
#: defaults pair them), capped at 128.
DEFAULT_V4_LEN = 24
V6_EXTRA_BITS = 24
#: `who`'s top source prefixes per observer.
WHO_TOP_SOURCES = 3
#: `top -n`'s bounds: a top list longer than this is a dump; use `reports`.
MAX_TOP_N = 1000
DEFAULT_TOP_N = 10

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: A time before the epoch or after 9999 is no flow's time: it is a typo (and overflows).
_MAX_MS = 253_402_300_799_999


def parse_when(text: str, *, name: str, now_ms: int) -> int:
    """``15m``/``1h``/``2d``/``1w`` ago, ``now``, or an RFC 3339 / ISO 8601 time -> Unix ms.

    A time without a zone is UTC (a desk compares with logs in UTC). ValueError names ``name``.
    """
    t = text.strip()
    if t == "now":
        return now_ms
    m = _DURATION.match(t)
    if m:
        # capped: "9999...9s" is inf as a float, which int() refuses (a 500 on the API)
        ago_ms = min(float(m.group(1)) * _UNITS[m.group(2)] * 1000, _MAX_MS)
        return max(0, now_ms - int(ago_ms))
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{name} {text[:40]!r}: expected 15m, 1h, 2d, 1w ago, 'now', "
            "or an RFC 3339 time like 2026-12-01T10:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    ms = int(when.timestamp() * 1000)
    if not 0 <= ms <= _MAX_MS:
        raise ValueError(f"{name} {text[:40]!r}: before 1970 or after 9999")
    return ms


def parse_network(text: str, *, name: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{name} {text[:60]!r}: not an address or prefix") from None


def parse_proto(text: str, *, name: str) -> int:
    t = text.strip().lower()
    if t in PROTOCOLS:
        return PROTOCOLS[t]
    if t.isdigit() and 0 <= int(t) <= 255:
        return int(t)
    raise ValueError(f"{name} {text[:40]!r}: expected {', '.join(PROTOCOLS)} or a number 0-255")


def parse_port(text: str, *, name: str) -> int:
    t = text.strip()
    if t.isdigit() and 0 <= int(t) <= 65535:
        return int(t)
    raise ValueError(f"{name} {text[:40]!r}: expected a port number 0-65535")


def parse_kind(text: str, *, name: str) -> str:
    if len(text) > rpt.MAX_KIND_BYTES or not rpt.KIND_RE.fullmatch(text):
        raise ValueError(f"{name} {text[:40]!r}: a kind is lowercase letters, digits and '-'")
    return text


def parse_trust(text: str, *, name: str) -> str:
    if text not in TRUST_LEVELS:
        raise ValueError(f"{name} {text[:40]!r}: expected one of {', '.join(TRUST_LEVELS)}")
    return text


def parse_by(text: str, *, name: str) -> str:
    if text not in GROUP_BY:
        raise ValueError(f"{name} {text[:40]!r}: expected one of {', '.join(GROUP_BY)}")
    return text


def prefix_lengths(v4_len: int | None) -> tuple[int, int]:
    """(IPv4, IPv6) prefix lengths for grouping by address (see ``V6_EXTRA_BITS``)."""
    v4 = DEFAULT_V4_LEN if v4_len is None else v4_len
    return v4, min(128, v4 + V6_EXTRA_BITS)


def observer_key_or_none(text: str) -> bytes | None:
    """A 32-byte key if ``text`` is one in base64 (standard or url-safe), else None."""
    t = text.strip()
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            key = decode(t + "=" * (-len(t) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return key
    return None


#: The filter parameters, by their API names; the CLI's flags are these with '--' and '-'.
FILTER_PARAMS = (
    "since", "until", "received_since", "received_until", "src", "dst", "prefix",
    "proto", "port", "sport", "dport", "kind", "observer", "min_trust",
)  # fmt: skip


def make_filter(
    text: Mapping[str, str | None],
    *,
    now_ms: int,
    observers: Callable[[str], tuple[bytes, ...]],
    flag: Callable[[str], str] = lambda name: name,
) -> ReportFilter:
    """The filter the parameters in ``text`` (API names; None or absent = not given) ask for.

    ``observers`` turns an --observer's key or fingerprint into keys (it reads the store);
    ``flag`` names a parameter in messages (``--min-trust`` for the CLI). ValueError, naming
    the parameter, for the first bad value.
    """
    from overflowd.store.base import ReportFilter

    def get(name: str) -> str | None:
        value = text.get(name)
        return None if value is None or value == "" else value

    def when(name: str) -> int | None:
        value = get(name)
        return None if value is None else parse_when(value, name=flag(name), now_ms=now_ms)

    def net(name: str) -> Network | None:
        value = get(name)
        return None if value is None else parse_network(value, name=flag(name))

    def port(name: str) -> int | None:
        value = get(name)
        return None if value is None else parse_port(value, name=flag(name))

    proto, kind, observer, trust = (get(n) for n in ("proto", "kind", "observer", "min_trust"))
    keys: tuple[bytes, ...] = ()
    if observer is not None:
        try:
            keys = observers(observer)
        except ValueError as exc:
            why = str(exc).removeprefix("observer ")  # the library names no flag: we do
            raise ValueError(f"{flag('observer')} {why}") from None
    flt = ReportFilter(
        since_ms=when("since"),
        until_ms=when("until"),
        received_since_ms=when("received_since"),
        received_until_ms=when("received_until"),
        src=net("src"),
        dst=net("dst"),
        either=net("prefix"),
        proto=None if proto is None else parse_proto(proto, name=flag("proto")),
        port=port("port"),
        sport=port("sport"),
        dport=port("dport"),
        kind=None if kind is None else parse_kind(kind, name=flag("kind")),
        observers=keys,
        min_trust=None if trust is None else parse_trust(trust, name=flag("min_trust")),
    )
    if flt.since_ms is not None and flt.until_ms is not None and flt.since_ms > flt.until_ms:
        raise ValueError(f"{flag('since')} is after {flag('until')}: nothing can match")
    return flt


# ---------------------------------------------------------------------------------------------
# The rows


def report_json(row: StoredReport) -> dict[str, Any]:
    """One stored report: this node's facts about it and the report's own rendering (with
    ``cose``, the observer's signed bytes: verify those, not this server)."""
    return report_object(
        row.seq, row.received_ms, row.via, row.trust, row.hops, row.signed_report()
    )


def report_object(
    seq: int,
    received_ms: int,
    via: str,
    trust: str | None,
    hops: int,
    signed: rpt.SignedReport,
) -> dict[str, Any]:
    """:func:`report_json` from its parts (the stdlib SQLite reader's rows are no StoredReport:
    :mod:`overflowd.store.fastread`)."""
    return {
        "seq": seq,
        "received": rpt.iso_ms(received_ms),
        "via": via,
        "trust": trust,
        "hops": hops,
        "report": rpt.to_json(signed),
    }


def _estimate_json(estimate: Estimate) -> dict[str, Any]:
    """Estimate.to_json with every unbounded number null, not only ``high``: an observer
    claiming p = 1e-300 makes ``estimate`` infinite, which json.dumps writes as ``Infinity``
    (not JSON: jq refuses it) while the API (pydantic) writes null."""
    out = estimate.to_json()
    for name in ("packets", "bytes"):
        interval = dict(out[name])  # type: ignore[call-overload]
        for field, value in interval.items():
            if isinstance(value, float) and not math.isfinite(value):
                interval[field] = None
        out[name] = interval
    return out


@dataclass(frozen=True)
class RegistryContacts:
    """What DNS says about one network an observer's reports came from (``who``'s
    ``registry``; looked up by :mod:`overflowd.services.who_dns`)."""

    network: str
    #: from the network's ``_overflowd`` record, only if it names the observer's key
    contacts: tuple[str, ...]
    #: from the ``[registry] abuse_zones`` for the network
    abuse_contacts: tuple[str, ...]
    #: does the record name the observer's key? None: the record lookup did not answer
    record_names_key: bool | None
    #: None, "timeout" (no answer within the budget), or why a lookup failed
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "contacts": list(self.contacts),
            "abuse_contacts": list(self.abuse_contacts),
            "record_names_key": self.record_names_key,
            "error": self.error,
        }


def who_json(row: WhoRow, registry: Sequence[RegistryContacts] | None = None) -> dict[str, Any]:
    """One observer behind the traffic asked about: whom to call, and how much it saw.

    ``registry`` is null when DNS was not asked (not configured, ``--no-dns``, or beyond the
    first rows), else one entry per network its reports came from (none: no in-band report).
    """
    return {
        "observer": {
            "key": base64.b64encode(row.observer_key).decode("ascii"),
            "fingerprint": row.fingerprint,
            "point": row.point,
        },
        "trust": row.trust,
        "contacts": list(row.contacts),
        "first": rpt.iso_ms(row.first_ms),
        "last": rpt.iso_ms(row.last_ms),
        "first_ms": row.first_ms,
        "last_ms": row.last_ms,
        **_estimate_json(row.estimate),
        "top_sources": [
            {"prefix": str(net), **_estimate_json(est)} for net, est in row.top_sources
        ],
        "registry": None if registry is None else [r.to_json() for r in registry],
    }


def _key_json(by: str, key: GroupKey | str) -> tuple[Any, str | None]:
    """The group's key as JSON, and a name for people (protocol name, key fingerprint)."""
    if key == OTHER:
        return OTHER, None
    if by == "observer" and isinstance(key, bytes):
        return base64.b64encode(key).decode("ascii"), rpt.key_fingerprint(key)
    if by == "proto" and isinstance(key, int):
        return key, PROTO_NAMES.get(key)
    if isinstance(key, int):
        return key, None
    return str(key), None


def top_json(result: TopResult[GroupKey], *, by: str) -> list[dict[str, Any]]:
    """The top rows, then "other" (rank null): everything else, exactly."""
    out = []
    for rank, (key, estimate) in enumerate(result.rows(), start=1):
        value, label = _key_json(by, key)
        out.append(
            {
                "by": by,
                "rank": None if key == OTHER else rank,
                "key": value,
                "name": label,
                **_estimate_json(estimate),
            }
        )
    return out


def count_line(shown: int, total: int, noun: str) -> str:
    """The footer: '5 of 247 reports' (or '247 reports' when all are shown)."""
    plural = noun if total == 1 else noun + "s"
    return f"{total} {plural}" if shown == total else f"{shown} of {total} {plural}"


def names_of(items: Iterable[str]) -> str:
    return ", ".join(items) or "-"


__all__ = [
    "PROTOCOLS",
    "PROTO_NAMES",
    "TRUST_LEVELS",
    "RegistryContacts",
    "count_line",
    "parse_when",
    "report_json",
    "top_json",
    "who_json",
]
