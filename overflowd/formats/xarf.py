"""Signed reports as XARF v4 abuse reports (https://xarf.org), category connection, type ddos.

One XARF report per *incident*: the reports of one observer about one destination address
from one source endpoint (address and port) over one protocol. XARF names exactly one
``source_identifier`` and, for an IP source, one ``source_port`` (required by the connection/ddos
schema: CGNAT operators need it), so a destination's flood from many sources is many XARF
reports, each for the abuse desk of its source's network. More than MAX_EVIDENCE reports in
an incident are split into several XARF reports.

Every evidence item is one report's COSE_Sign1 bytes, verbatim: base64, content type
``application/cose; cose-type="cose-sign1"``, ``hash`` = ``sha256:<report id>`` (the report id
is that hash), so the receiver can check the observer's signature without trusting us.

Sans-IO: pure functions over SignedReport values; no clock is read (every time is the flow's).
docs/formats.md explains every field.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from overflowd.formats._common import (
    _MAX_RFC3339_MS,
    COSE_MEDIA_TYPE,
    FormatError,
    b64,
    decode_cose_b64,
    flow_span,
    rfc3339_ms,
    unique_reports,
    uuid5,
)
from overflowd.report import SignedReport, key_fingerprint

#: The XARF spec version whose schemas we write to (xarf-spec v4.2.0, bundled by xarf 1.0).
XARF_VERSION = "4.2.0"
#: xarf-core.json: ``evidence`` has ``maxItems: 50``.
MAX_EVIDENCE = 50
#: xarf-core.json length limits on the free-text fields we fill.
MAX_DESCRIPTION_CHARS = 1000
MAX_EVIDENCE_DESCRIPTION_CHARS = 500
MAX_ORG_CHARS = 200
MAX_TAGS = 20
#: Protocol numbers the connection/ddos schema can name (its ``protocol`` enum).
XARF_PROTOCOLS = {1: "icmp", 58: "icmp", 6: "tcp", 17: "udp", 132: "sctp"}
#: UDP source ports of the usual reflectors: a flood *from* one of them is that amplification
#: (the names are the examples in connection-ddos.json, and the same style for the rest).
_AMPLIFIERS = {19: "chargen_amplification", 53: "dns_amplification",
               123: "ntp_amplification", 161: "snmp_amplification",
               389: "cldap_amplification", 1900: "ssdp_amplification",
               11211: "memcached_amplification"}  # fmt: skip
_TCP_SYN, _TCP_ACK = 0x02, 0x10
#: Shortest flow record whose average rate counts towards ``peak_pps``/``peak_bps``.
MIN_RATE_SPAN_MS = 1000

# RFC 5322 dot-atom local part and an RFC 1123 host name: what the schema's "email" and
# "hostname" formats accept, and what an abuse desk can answer.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_EMAIL_RE = re.compile(rf"({_LOCAL})@({_LABEL}(?:\.{_LABEL})*)")


def _email(text: str) -> tuple[str, str] | None:
    """``(address, domain)`` of an e-mail address or a ``mailto:`` URI, or None."""
    if text[:7].lower() == "mailto:":
        text = urllib.parse.unquote(text[7:].split("?", 1)[0].split(",", 1)[0])
    m = _EMAIL_RE.fullmatch(text.strip())
    if m is None or len(m.group(2)) > 253:
        return None
    return m.group(0), m.group(2).lower()


def _contact_info(org: str, address: str, domain: str) -> dict[str, str]:
    return {"org": org[:MAX_ORG_CHARS], "contact": address, "domain": domain}


def unfit_reason(report: SignedReport) -> str | None:
    """Why a report cannot be an XARF connection/ddos report, or None if it can."""
    fl = report.payload.flow
    if fl.proto not in XARF_PROTOCOLS:
        return f"protocol {fl.proto} has no XARF name (tcp, udp, icmp and sctp only)"
    if fl.sport == 0:
        return "source port 0: XARF connection/ddos requires a source port 1-65535 for an IP"
    if max(fl.first, fl.last) > _MAX_RFC3339_MS:  # a signer may write any 64-bit time
        return "a flow time past year 9999, which RFC 3339 cannot write"
    return None


def _attack_vector(proto: int, sport: int, flags: int) -> str:
    """A label from what the flows show (protocol, source port, TCP flags), nothing more."""
    if proto == 17:
        return _AMPLIFIERS.get(sport, "udp_flood")
    if proto == 6:
        return "syn_flood" if flags & (_TCP_SYN | _TCP_ACK) == _TCP_SYN else "tcp_flood"
    return f"{XARF_PROTOCOLS[proto]}_flood"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _evidence(report: SignedReport) -> dict[str, Any]:
    p = report.payload
    fl = p.flow
    described = (
        f"overflowd report {report.report_id}: COSE_Sign1 (RFC 9052) signed by Ed25519 key "
        f"{b64(report.observer_key)}; flow {fl.src} port {fl.sport} to {fl.dst} port "
        f"{fl.dport}, IP protocol {fl.proto}, {fl.packets} packets, {fl.bytes} bytes, "
        f"{rfc3339_ms(fl.first, report.report_id)} to {rfc3339_ms(fl.last, report.report_id)}, "
        f"reported with probability {p.sampling.probability!r} (exporter sampling 1 in "
        f"{p.sampling.interval})"
    )
    return {
        "content_type": COSE_MEDIA_TYPE,
        "description": _cut(described, MAX_EVIDENCE_DESCRIPTION_CHARS),
        "payload": b64(report.cose),
        "hash": f"sha256:{report.report_id}",
        "size": len(report.cose),
    }


def _incident(chunk: Sequence[SignedReport], reporter: dict[str, str] | None) -> dict[str, Any]:
    head = chunk[0]
    fl = head.payload.flow
    # The observer as it describes itself now: its newest report's contacts and point.
    obs = max(chunk, key=lambda r: (r.payload.time, r.report_id)).payload.observer
    fp = key_fingerprint(head.observer_key)
    if reporter is None:
        found = next(filter(None, map(_email, obs.contacts)), None)
        if found is None:
            raise FormatError(
                f"report {head.report_id}: observer {fp} has no e-mail contact, which XARF "
                "requires; give the reporter's own contact"
            )
        reporter = _contact_info(f"overflowd observer {fp}", *found)
    first, last = flow_span(chunk)
    dports = {r.payload.flow.dport for r in chunk}
    flags = 0
    for r in chunk:
        flags |= r.payload.flow.tcp_flags
    kinds = sorted({r.payload.kind for r in chunk})
    packets = sum(r.payload.flow.packets for r in chunk)
    octets = sum(r.payload.flow.bytes for r in chunk)
    described = (
        f"{len(chunk)} sampled flow report(s) signed by overflowd observer {fp} (point "
        f"{obs.point or '-'}, contacts {', '.join(obs.contacts) or '-'}): {packets} packets and "
        f"{octets} bytes from {fl.src} port {fl.sport} to {fl.dst} as the exporters recorded "
        "them. Each evidence item is one signed report; verify it with `overflowd-query verify` "
        "or any COSE_Sign1 Ed25519 verifier (kid = the observer's public key)."
    )
    doc: dict[str, Any] = {
        "xarf_version": XARF_VERSION,
        "report_id": uuid5("xarf", *(r.report_id for r in chunk)),
        "timestamp": rfc3339_ms(first, head.report_id),
        "reporter": reporter,
        "sender": dict(reporter),
        "source_identifier": str(fl.src),
        "source_port": fl.sport,
        "category": "connection",
        "type": "ddos",
        "evidence_source": "flow_analysis",
        "destination_ip": str(fl.dst),
        "protocol": XARF_PROTOCOLS[fl.proto],
        "attack_vector": _attack_vector(fl.proto, fl.sport, flags),
        "first_seen": rfc3339_ms(first, head.report_id),
        "last_seen": rfc3339_ms(last, head.report_id),
        "description": _cut(described, MAX_DESCRIPTION_CHARS),
        # "namespace:predicate" tags; a kind (report.KIND_RE) always fits the tag pattern.
        "tags": [f"observer:{fp}", *(f"overflowd:{k}" for k in kinds)][:MAX_TAGS],
        "evidence": [_evidence(r) for r in chunk],
    }
    # One destination port for the whole incident, or none; an ICMP "port" is type and code.
    if len(dports) == 1 and fl.proto in (6, 17, 132) and fl.dport != 0:
        doc["destination_port"] = fl.dport
    if last - first >= 1:
        doc["duration_seconds"] = math.ceil((last - first) / 1000)
    doc.update(_peaks(chunk))
    return doc


def _peaks(chunk: Sequence[SignedReport]) -> dict[str, int]:
    """``peak_pps``/``peak_bps`` as the highest average rate of one flow record of the incident.

    A lower bound of the true peak (flows overlap; sampling misses some), and only from
    records lasting at least MIN_RATE_SPAN_MS: a two-packet record 1 ms long says nothing
    about a rate. Left out when no record qualifies or the rate is below 1 (schema minimum).
    """
    pps = bps = 0
    for r in chunk:
        fl = r.payload.flow
        span = abs(fl.last - fl.first)
        if span >= MIN_RATE_SPAN_MS:
            k = r.payload.sampling.interval
            pps = max(pps, fl.packets * k * 1000 // span)
            bps = max(bps, fl.bytes * k * 8000 // span)
    out = {}
    if pps >= 1:
        out["peak_pps"] = pps
    if bps >= 1:
        out["peak_bps"] = bps
    return out


def xarf_reports(
    reports: Sequence[SignedReport],
    *,
    reporter_contact: str | None = None,
    reporter_name: str | None = None,
    skip_unfit: bool = False,
) -> list[dict[str, Any]]:
    """One XARF v4 connection/ddos report (a JSON-ready dict) per incident, oldest first.

    ``reporter_contact`` (an e-mail address or ``mailto:`` URI) and ``reporter_name`` name the
    node filing the reports as XARF ``reporter`` and ``sender``; without them each incident's
    observer is named, by its first e-mail contact (FormatError if it has none). Reports XARF
    cannot express (see :func:`unfit_reason`) raise FormatError, or are left out with
    ``skip_unfit``. The same reports give the same documents, ids included.
    """
    reporter: dict[str, str] | None = None
    if reporter_contact is not None:
        found = _email(reporter_contact)
        if found is None:
            raise FormatError(f"reporter contact {reporter_contact!r} is not an e-mail address")
        reporter = _contact_info(reporter_name or found[1], *found)
    elif reporter_name is not None:
        raise FormatError("a reporter name needs a reporter contact (an e-mail address)")
    groups: dict[tuple[bytes, bytes, int, bytes, int], list[SignedReport]] = {}
    for report in unique_reports(reports):
        reason = unfit_reason(report)
        if reason is not None:
            if skip_unfit:
                continue
            raise FormatError(f"report {report.report_id}: {reason}")
        fl = report.payload.flow
        key = (report.observer_key, fl.src.packed, fl.sport, fl.dst.packed, fl.proto)
        groups.setdefault(key, []).append(report)
    # Oldest incident first; an incident's parts in flow order (unique_reports sorted them).
    ordered = sorted(groups.items(), key=lambda kv: (kv[1][0].payload.flow.first, kv[0]))
    return [
        _incident(members[i : i + MAX_EVIDENCE], reporter)
        for _, members in ordered
        for i in range(0, len(members), MAX_EVIDENCE)
    ]


def cose_from_xarf(doc: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[bytes]:
    """The COSE bytes of every report in XARF evidence (one report or a list), in order.

    Only items of our content type are read; each must be base64 of at most one report and
    match its ``hash``. The bytes are not verified here: ``identity.verify_report`` does that.
    """
    docs = [doc] if isinstance(doc, Mapping) else list(doc)
    out: list[bytes] = []
    for n, one in enumerate(docs):
        if not isinstance(one, Mapping):
            raise FormatError(f"XARF document {n} is not an object")
        evidence = one.get("evidence", [])
        if not isinstance(evidence, list):
            raise FormatError(f"XARF document {n}: evidence is not a list")
        for i, item in enumerate(evidence):
            where = f"XARF document {n} evidence {i}"
            if not isinstance(item, Mapping) or item.get("content_type") != COSE_MEDIA_TYPE:
                continue
            digest = item.get("hash")
            sha256 = None
            if isinstance(digest, str) and digest.lower().startswith("sha256:"):
                sha256 = digest[7:]
            out.append(decode_cose_b64(item.get("payload"), where, sha256))
    return out
