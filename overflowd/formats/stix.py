"""Signed reports as one STIX 2.1 bundle (OASIS STIX 2.1, stix2-validator clean).

Per report: an ``observed-data`` (created by the observer's ``identity``, first/last observed =
the flow's own times) whose objects are a ``network-traffic`` with its ``ipv4-addr``/``ipv6-addr``
ends and an ``artifact`` holding the report's COSE_Sign1 bytes verbatim (``payload_bin``,
``mime_type`` application/cose, ``hashes`` SHA-256 = the report id), so the observer's signature
still verifies after any number of JSON round trips.

Per incident (the reports of one observer about one destination address): a ``sighting`` of a
flooding ``attack-pattern`` (CAPEC-125) where the observer saw it, referencing those
observed-data, with their count and time span.

Ids are deterministic: SCOs by STIX 2.1 §2.9 (UUIDv5 of their id-contributing properties),
SDOs and SROs UUIDv5 of the report ids they stand for, so the same reports give the same
bundle, byte for byte after ``json.dumps(sort_keys=True)``. No clock is read: ``created_ms``
is passed in, or the newest report's signing time is used.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from overflowd.formats._common import (
    _MAX_RFC3339_MS,
    COSE_MEDIA_TYPE,
    FormatError,
    b64,
    canonical_json,
    decode_cose_b64,
    flow_span,
    rfc3339_ms,
    unique_reports,
    uuid5,
)
from overflowd.report import SignedReport, key_fingerprint

#: STIX 2.1 §2.9: the namespace of deterministic SCO ids.
STIX_SCO_NS = uuid.UUID("00abedb4-aa42-466c-9c01-fed23315a9b7")
#: STIX 2.1 §2.9: integers are exact only up to 2**53 - 1; larger counts are left out of
#: ``src_packets``/``src_byte_count`` (the artifact's COSE still holds them exactly).
STIX_MAX_INT = 2**53 - 1
#: sighting ``count`` (STIX 2.1 §5.2: 0 to 999,999,999).
STIX_MAX_COUNT = 999_999_999
#: MIME type of the artifact: the media type of COSE (RFC 9052 §9.1) without parameters, as
#: the artifact's ``mime_type`` SHOULD be an IANA registered type name.
ARTIFACT_MIME_TYPE = "application/cose"

#: Protocol numbers ``protocols`` can name: the validator checks names against the IANA
#: service name and transport protocol registry, which has these. ICMPv6 is written "icmp"
#: (IPv6's ICMP; ``ipfix.protocolIdentifier`` keeps 58); others only as protocolIdentifier.
STIX_TRANSPORTS = {1: "icmp", 58: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 132: "sctp"}
ICMP_PROTOCOLS = frozenset({1, 58})
#: STIX 2.1 §6.12: the network-traffic properties its deterministic id is made of.
_TRAFFIC_ID_PROPERTIES = ("start", "end", "src_ref", "dst_ref", "src_port", "dst_port",
                          "protocols", "extensions")  # fmt: skip

_FLOODING_ID = "attack-pattern--" + uuid5("capec", "CAPEC-125")
_FLOODING: dict[str, Any] = {
    "type": "attack-pattern",
    "spec_version": "2.1",
    "id": _FLOODING_ID,
    "name": "Flooding",
    "description": "An adversary consumes the resources of a target by rapidly engaging in a "
    "large number of interactions with the target (CAPEC-125).",
    "external_references": [
        {
            "source_name": "capec",
            "external_id": "CAPEC-125",
        }
    ],
}


def _transport(proto: int) -> list[str]:
    name = STIX_TRANSPORTS.get(proto)
    return [name] if name else []


def _hex(value: int) -> str:
    """STIX hex: an even number of hex digits."""
    text = f"{value:x}"
    return "0" * (len(text) % 2) + text


def _exact(n: int) -> int | str:
    return n if n <= STIX_MAX_INT else str(n)


def _sco_id(kind: str, contributing: Mapping[str, Any]) -> str:
    return f"{kind}--{uuid.uuid5(STIX_SCO_NS, canonical_json(contributing))}"


def _address(value: str, version: int) -> dict[str, Any]:
    kind = "ipv4-addr" if version == 4 else "ipv6-addr"
    return {"type": kind, "spec_version": "2.1", "id": _sco_id(kind, {"value": value}),
            "value": value}  # fmt: skip


def _identity(key: bytes, contacts: Sequence[str], point: str, created: str) -> dict[str, Any]:
    fp = key_fingerprint(key)
    out: dict[str, Any] = {
        "type": "identity",
        "spec_version": "2.1",
        "id": "identity--" + uuid5("observer", key.hex()),
        "created": created,
        "modified": created,
        "name": f"overflowd observer {fp}",
        "description": f"Signs flow reports with Ed25519 key {b64(key)} (fingerprint {fp})"
        + (f" at observation point {point}." if point else "."),
        "identity_class": "system",
    }
    if contacts:
        out["contact_information"] = ", ".join(contacts)
    return out


def _report_objects(report: SignedReport, identity_id: str) -> list[dict[str, Any]]:
    p = report.payload
    fl = p.flow
    rid = report.report_id
    src = _address(str(fl.src), fl.src.version)
    dst = _address(str(fl.dst), fl.dst.version)
    first, last = flow_span([report])
    start, end = rfc3339_ms(first, rid), rfc3339_ms(last, rid)
    traffic: dict[str, Any] = {
        "type": "network-traffic",
        "spec_version": "2.1",
        "start": start,
        "end": end,
        "src_ref": src["id"],
        "dst_ref": dst["id"],
        "src_port": fl.sport,
        "dst_port": fl.dport,
        "protocols": [f"ipv{fl.src.version}", *_transport(fl.proto)],
    }
    if fl.proto in ICMP_PROTOCOLS:
        # NetFlow and IPFIX exporters put an ICMP record's type and code in its destination
        # port (overflowd/wire/packet.py does too): the ports stay as the record has them
        # (the validator wants both), and icmp-ext says what they mean.
        icmp = {"icmp_type_hex": f"{fl.dport >> 8:02x}", "icmp_code_hex": f"{fl.dport & 0xFF:02x}"}
        traffic["extensions"] = {"icmp-ext": icmp}
    elif fl.proto == 6 and fl.tcp_flags:
        traffic["extensions"] = {"tcp-ext": {"src_flags_hex": _hex(fl.tcp_flags)}}
    contributing = {k: traffic[k] for k in _TRAFFIC_ID_PROPERTIES if k in traffic}
    traffic["id"] = _sco_id("network-traffic", contributing)
    if fl.packets <= STIX_MAX_INT:
        traffic["src_packets"] = fl.packets
    if fl.bytes <= STIX_MAX_INT:
        traffic["src_byte_count"] = fl.bytes
    # IPFIX information elements (RFC 7012) by their IANA names: the exact protocol number
    # whatever ``protocols`` could name, and the counts exactly (as text past 2**53 - 1).
    ipfix: dict[str, int | str] = {
        "protocolIdentifier": fl.proto,
        "packetDeltaCount": _exact(fl.packets),
        "octetDeltaCount": _exact(fl.bytes),
        "samplingInterval": p.sampling.interval,
    }
    if fl.proto == 6:
        ipfix["tcpControlBits"] = fl.tcp_flags
    traffic["ipfix"] = ipfix
    hashes = {"SHA-256": rid}
    artifact = {
        "type": "artifact",
        "spec_version": "2.1",
        "id": _sco_id("artifact", {"hashes": hashes, "payload_bin": b64(report.cose)}),
        "mime_type": ARTIFACT_MIME_TYPE,
        "payload_bin": b64(report.cose),
        "hashes": hashes,
    }
    made = rfc3339_ms(p.time, rid)
    observed = {
        "type": "observed-data",
        "spec_version": "2.1",
        "id": "observed-data--" + uuid5("observed-data", rid),
        "created_by_ref": identity_id,
        "created": made,
        "modified": made,
        "first_observed": start,
        "last_observed": end,
        "number_observed": 1,
        "object_refs": [traffic["id"], src["id"], dst["id"], artifact["id"]],
    }
    return [observed, traffic, src, dst, artifact]


def stix_bundle(
    reports: Sequence[SignedReport],
    *,
    created_ms: int | None = None,
    skip_unwritable: bool = False,
) -> dict[str, Any]:
    """One STIX 2.1 bundle (a JSON-ready dict) of the reports; the same reports, the same bundle.

    ``created_ms`` stamps the objects this rendering makes (identities, attack pattern,
    sightings); by default the newest report's signing time, so nothing depends on a clock.
    Observed-data carry their report's own signing time. FormatError for a time RFC 3339
    cannot write (past year 9999); ``skip_unwritable`` leaves such reports out instead (any
    signer may write such a time: one stored report must not stop a view's every export).
    """
    unique = unique_reports(reports)
    if skip_unwritable:
        unique = [
            r
            for r in unique
            if max(r.payload.time, r.payload.flow.first, r.payload.flow.last) <= _MAX_RFC3339_MS
        ]
    if created_ms is None:
        created_ms = max((r.payload.time for r in unique), default=0)
    created = rfc3339_ms(created_ms, "created_ms")
    objects: dict[str, dict[str, Any]] = {}
    identities: dict[bytes, str] = {}
    incidents: dict[tuple[bytes, bytes], list[tuple[SignedReport, str]]] = {}
    # Each observer as it describes itself now: its newest report's contacts and point.
    newest: dict[bytes, SignedReport] = {}
    for report in unique:
        seen = newest.get(report.observer_key)
        if seen is None or (report.payload.time, report.report_id) > (
            seen.payload.time,
            seen.report_id,
        ):
            newest[report.observer_key] = report
    for report in unique:
        if report.observer_key not in identities:
            obs = newest[report.observer_key].payload.observer
            ident = _identity(report.observer_key, obs.contacts, obs.point, created)
            identities[report.observer_key] = ident["id"]
            objects[ident["id"]] = ident
        parts = _report_objects(report, identities[report.observer_key])
        for obj in parts:
            objects.setdefault(obj["id"], obj)
        key = (report.observer_key, report.payload.flow.dst.packed)
        incidents.setdefault(key, []).append((report, parts[0]["id"]))
    if incidents:
        objects[_FLOODING_ID] = {**_FLOODING, "created": created, "modified": created}
    for (observer, _dst), members in incidents.items():
        first, last = flow_span(r for r, _ in members)
        ids = [r.report_id for r, _ in members]
        sighting: dict[str, Any] = {
            "type": "sighting",
            "spec_version": "2.1",
            "id": "sighting--" + uuid5("sighting", *ids),
            "created": created,
            "modified": created,
            "first_seen": rfc3339_ms(first, ids[0]),
            "last_seen": rfc3339_ms(last, ids[0]),
            "count": min(len(members), STIX_MAX_COUNT),
            "sighting_of_ref": _FLOODING_ID,
            "observed_data_refs": [od for _, od in members],
            "where_sighted_refs": [identities[observer]],
            "description": f"Flood towards {members[0][0].payload.flow.dst} seen in "
            f"{len(members)} signed flow report(s) of observer {key_fingerprint(observer)}.",
        }
        objects[sighting["id"]] = sighting
    return {
        "type": "bundle",
        "id": "bundle--" + uuid5("bundle", *(r.report_id for r in unique)),
        "objects": list(objects.values()),
    }


def cose_from_stix(bundle: Mapping[str, Any]) -> list[bytes]:
    """The COSE bytes of every report artifact in a bundle, in bundle order.

    Only artifacts of our MIME type are read; each must be base64 of at most one report and
    match its SHA-256 hash when it has one. Not verified here: ``identity.verify_report`` does.
    """
    if not isinstance(bundle, Mapping) or bundle.get("type") != "bundle":
        raise FormatError("STIX document is not a bundle")
    objects = bundle.get("objects", [])
    if not isinstance(objects, list):
        raise FormatError("STIX bundle: objects is not a list")
    out: list[bytes] = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, Mapping) or obj.get("type") != "artifact":
            continue
        if obj.get("mime_type") not in (ARTIFACT_MIME_TYPE, COSE_MEDIA_TYPE):
            continue
        hashes = obj.get("hashes")
        sha256 = hashes.get("SHA-256") if isinstance(hashes, Mapping) else None
        where = f"STIX bundle object {i} ({obj.get('id', '?')})"
        checked = sha256 if isinstance(sha256, str) else None
        out.append(decode_cose_b64(obj.get("payload_bin"), where, checked))
    return out
