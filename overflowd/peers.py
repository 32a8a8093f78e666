"""Peers: the nodes this node exchanges reports with, and the signed record a node shows them.

Sans-IO: settings parsed from TOML values, and the node record codec (bytes in, values out).
Signing and verifying are injected (``sign`` / ``check`` callables, as :mod:`overflowd.report`
takes them; :mod:`overflowd.identity` holds the Ed25519 key and passes them in), so this module
imports no crypto, no sockets, no clock, no database.

Two things live here:

* ``[[peers]]`` and ``[peering]``: :class:`PeerSettings` (one configured peer: its API base URL,
  its Ed25519 key, the trust its reports get, whether we push to it, how often we pull from it,
  its budgets in and out) and :class:`PeeringSettings` (limits common to every peer). Parsing is
  strict: an unknown key, a key that is not 32 bytes of base64, two peers with one name or key
  are errors naming the file, the line and the key.
* The node record (:class:`NodeRecord`): a COSE_Sign1 (RFC 9052) by the node key over
  deterministic CBOR of its key, contacts, observation point, API endpoint and time, with its
  own content type (:data:`NODE_CONTENT_TYPE`) so that a record can never be taken for a report
  or a report for a record. ``GET /v1/identity`` carries one (``signed``); a node that learns
  peers from others checks it with :func:`verify_node_record`.

It must never accept two byte strings for one signed record (the same strictness as reports:
tag 18, empty unprotected header, canonical encoding), nor a record whose ``kid`` differs from
the key it names.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

import cbor2

from overflowd import report as rpt
from overflowd.errors import ConfigError, ReportDecodeError

SECONDS = 1.0
MINUTES = 60 * SECONDS
DAYS = 86_400 * SECONDS

#: The trust a peer's reports get, lowest first (the query layer's ``TRUST_ORDER``).
TRUST_LEVELS = ("unknown", "continuity", "dns", "pinned")

#: A peer's name is for people and logs: short, no spaces or control characters.
MAX_PEER_NAME_CHARS = 64
PEER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The URL column holds this much (``peer_state.url``, like the webhook outbox's).
MAX_PEER_URL_CHARS = 2048
#: Configured peers at most: each has its own pull task and push queue.
MAX_PEERS = 256
#: The shortest and longest pull period: a peer asked more often than once a second is
#: hammered for nothing (push carries the news); once a day is still a catch-up.
MIN_PULL_INTERVAL_S = 1 * SECONDS
MAX_PULL_INTERVAL_S = 1 * DAYS
#: ``peering.max_learned_peers`` at most: each learned peer has its own pull task.
MAX_LEARNED_PEERS = 256
#: Node records served at ``GET /v1/peers`` and read from a peer's at most: every configured
#: and learned peer's, the most a node holds.
MAX_PEER_RECORDS = MAX_PEERS + MAX_LEARNED_PEERS


@dataclass(frozen=True)
class PeerSettings:
    """One ``[[peers]]`` table: a node we pull reports from and (``push``) push ours to.

    ``key`` is the peer's Ed25519 public key (32 bytes; base64 in TOML): the key its inbox
    requests are signed with, and the one its node record must carry. Reports pulled from or
    pushed by it keep their observers' own signatures; ``trust`` is what they are labelled
    with when their observer has no better trust of its own.
    """

    name: str
    #: the peer's API base, e.g. ``http://127.0.0.1:9591/`` (always ends with ``/``)
    url: str
    key: bytes = field(repr=False)
    trust: str = "pinned"
    #: push our reports to its inbox (the peer-push service)
    push: bool = True
    #: pull its reports from ``GET /v1/reports`` (on start and every ``pull_interval_s``)
    pull: bool = True
    pull_interval_s: float = 1 * MINUTES
    #: What the peer may send us (its inbox pushes): reports and bytes per second, and the
    #: burst above that. A peer we trust is still one key away from a flood.
    in_reports_per_s: float = 100.0
    in_reports_burst: int = 5000
    in_bytes_per_s: float = 1_000_000.0
    in_bytes_burst: int = 10_000_000
    #: What we send it: deliveries beyond this wait in the outbox.
    out_reports_per_s: float = 100.0
    out_reports_burst: int = 5000
    out_bytes_per_s: float = 1_000_000.0
    out_bytes_burst: int = 10_000_000

    @property
    def key_b64(self) -> str:
        return base64.b64encode(self.key).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return rpt.key_fingerprint(self.key)

    @property
    def channel(self) -> str:
        """The arrival channel of reports from this peer (``report_arrivals.channel``)."""
        return peer_channel(self.key)

    def endpoint(self, path: str) -> str:
        """``path`` (e.g. ``v1/reports``) under the peer's API base."""
        return self.url + path.lstrip("/")


def peer_channel(key: bytes) -> str:
    """``peer:<fingerprint>``: how arrivals from the peer with this key are counted."""
    return "peer:" + rpt.key_fingerprint(key)


@dataclass(frozen=True)
class PeeringSettings:
    """``[peering]``: what applies to every peer (docs/peers.md)."""

    #: A report is forwarded at most this many hops from its observer: gossip among n nodes
    #: would otherwise circle for ever when one node's de-duplication forgets a report.
    hop_limit: int = 4
    #: One inbox request at most: a batch of ``inbox_max_reports`` reports of the largest
    #: size, base64url in JSON, is under 1 MB; more is not a batch we would send.
    inbox_max_body_bytes: int = 2_000_000
    inbox_max_reports: int = 500
    #: Reports asked per pull page (``?limit=``, the API's most), and the most bytes read of
    #: one page: 1000 reports are ~0.5 MB as a lean CBOR page, ~2 MB as an older peer's JSON
    #: page; a peer sending more is cut off and counted.
    pull_page_reports: int = 1000
    pull_max_body_bytes: int = 4_000_000
    #: One page request (connect, send, read the whole body) takes at most this long; the
    #: connect alone at most ``pull_connect_timeout_s``. A peer that stalls costs its own task
    #: this much, never another peer's.
    pull_timeout_s: float = 30 * SECONDS
    pull_connect_timeout_s: float = 5 * SECONDS
    #: Pages read in one pull round at most, then the round ends and the next one goes on from
    #: the cursor: a peer with millions of reports is caught up over several rounds, and a
    #: round always ends.
    pull_max_pages: int = 200
    #: After a failed pull, the next try waits this long at first, doubling up to the peer's
    #: ``pull_interval_s``.
    pull_retry_s: float = 5 * SECONDS
    #: Reports made longer ago than this are refused as stale, and those dated further ahead
    #: than ``max_future_s`` (observer clock skew) as future, as the in-band listener does. A
    #: week, not the in-band hour: a pull catches up after downtime, and the store still
    #: de-duplicates whatever it holds (received reports are kept 30 days, longer than this,
    #: so a report too old to refuse by age is still in the store to refuse as a duplicate).
    max_report_age_s: float = 7 * DAYS
    max_future_s: float = 300 * SECONDS
    #: This node's API base URL as peers should reach it, carried in its signed node record
    #: (``/v1/identity`` ``signed``). Empty: ``http://<api.listen>/`` when that names one
    #: address and port (not 0.0.0.0, ::, or port 0), else the record names no endpoint.
    api_url: str = ""
    #: Learned peers (docs/peers.md "Learned peers"): read each configured peer's
    #: ``/v1/peers`` and pull from the nodes its signed records name. Off by default: a learned
    #: peer is a stranger one of our peers vouches for only by handing on its record, and
    #: pulling from it costs requests, storage and the operator's attention.
    learn: bool = False
    #: Learn peers whose endpoint is a loopback, private or other internal address: refused
    #: by default, as webhook URLs are (overflowd/ssrf.py), so a peer's list cannot make this
    #: node send requests into its own network.
    learn_allow_private: bool = False
    #: Learned peers at most (each costs a pull task): one peer's list cannot grow it beyond.
    max_learned_peers: int = 16
    #: How often a learned peer is pulled (a configured one says its own pull_interval_s).
    learned_pull_interval_s: float = 1 * MINUTES

    def problems(self) -> list[tuple[str, str]]:
        """``(key, why)`` for each value out of its range; empty when all are fine."""
        out: list[tuple[str, str]] = []
        if not 1 <= self.hop_limit <= 64:
            out.append(("hop_limit", "must be between 1 and 64"))
        for name, lo, hi in (
            ("inbox_max_body_bytes", 1024, 1_000_000_000),
            ("inbox_max_reports", 1, 10_000),
            ("pull_page_reports", 1, 1000),  # the API's MAX_PAGE
            ("pull_max_body_bytes", 4096, 1_000_000_000),
            ("pull_max_pages", 1, 1_000_000),
            ("max_learned_peers", 0, MAX_LEARNED_PEERS),
        ):
            if not lo <= getattr(self, name) <= hi:
                out.append((name, f"must be between {lo} and {hi}"))
        for name in (
            "pull_timeout_s",
            "pull_connect_timeout_s",
            "pull_retry_s",
            "max_report_age_s",
            "max_future_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                out.append((name, "must be a positive number of seconds"))
        if not MIN_PULL_INTERVAL_S <= self.learned_pull_interval_s <= MAX_PULL_INTERVAL_S:
            out.append(
                (
                    "learned_pull_interval_s",
                    f"must be between {MIN_PULL_INTERVAL_S:g} and {MAX_PULL_INTERVAL_S:g} seconds",
                )
            )
        if len(self.api_url.encode()) > MAX_ENDPOINT_BYTES:
            out.append(("api_url", f"is longer than {MAX_ENDPOINT_BYTES} bytes"))
        elif self.api_url:
            try:
                _peer_url(self.api_url, lambda key, why: ConfigError(why))
            except ConfigError as exc:
                out.append(("api_url", str(exc)))
        return out

    def endpoint(self, api_listen: str) -> str:
        """The API base URL for the node record: ``api_url``, else one derived from
        ``api_listen`` ("ADDR:PORT") when it names one reachable address and port."""
        if self.api_url:
            return self.api_url if self.api_url.endswith("/") else self.api_url + "/"
        host, sep, port = api_listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or int(port) == 0 or host in ("", "0.0.0.0", "::"):
            return ""
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def fresh(time_ms: int, now_ms: int, *, max_age_s: float, max_future_s: float) -> str | None:
    """``'stale'``, ``'future'`` or None: the in-band listener's freshness rule, for a time."""
    if time_ms < now_ms - max_age_s * 1000:
        return "stale"
    if time_ms > now_ms + max_future_s * 1000:
        return "future"
    return None


# -- [[peers]] parsing --------------------------------------------------------------------------

_PEER_TYPES: dict[str, type] = {
    "name": str,
    "url": str,
    "key": str,
    "trust": str,
    "push": bool,
    "pull": bool,
    "pull_interval_s": float,
    "in_reports_per_s": float,
    "in_reports_burst": int,
    "in_bytes_per_s": float,
    "in_bytes_burst": int,
    "out_reports_per_s": float,
    "out_reports_burst": int,
    "out_bytes_per_s": float,
    "out_bytes_burst": int,
}
assert set(_PEER_TYPES) == {f.name for f in fields(PeerSettings)}


def parse_peers(value: Any, source: str = "<string>", text: str = "") -> tuple[PeerSettings, ...]:
    """``[[peers]]`` (a TOML array of tables) into settings; ConfigError naming file and line.

    ``text`` is the file's text, only to find the line of a bad key for the message.
    """
    if not isinstance(value, list):
        raise ConfigError(_at(source, text, None, None) + "'peers' must be an array of tables")
    if len(value) > MAX_PEERS:
        raise ConfigError(_at(source, text, 0, None) + f"more than {MAX_PEERS} [[peers]]")
    peers = [_parse_peer(item, i, source, text) for i, item in enumerate(value)]
    for attr, what in (("name", "name"), ("key", "key"), ("url", "url")):
        seen: dict[Any, int] = {}
        for i, peer in enumerate(peers):
            v = getattr(peer, attr)
            if v in seen:
                raise ConfigError(
                    _at(source, text, i, attr)
                    + f"'peers.{attr}': peers {seen[v] + 1} and {i + 1} have the same {what}"
                )
            seen[v] = i
    return tuple(peers)


def _parse_peer(item: Any, index: int, source: str, text: str) -> PeerSettings:
    if not isinstance(item, dict):
        raise ConfigError(_at(source, text, index, None) + "each [[peers]] entry must be a table")
    values: dict[str, Any] = {}
    for key, raw in item.items():
        where = _at(source, text, index, key)
        kind = _PEER_TYPES.get(key)
        if kind is None:
            raise ConfigError(where + f"unknown key 'peers.{key}'")
        values[key] = _coerce(raw, kind, where + f"'peers.{key}'")
    for key in ("name", "url", "key"):
        if key not in values:
            raise ConfigError(
                _at(source, text, index, None) + f"[[peers]] entry {index + 1} needs {key} = ..."
            )

    def fail(key: str, why: str) -> ConfigError:
        return ConfigError(_at(source, text, index, key) + f"'peers.{key}' {why}")

    name = values["name"]
    if len(name) > MAX_PEER_NAME_CHARS or not PEER_NAME_RE.fullmatch(name):
        raise fail(
            "name", f"has {name[:80]!r}: letters, digits, '.', '_', '-', at most 64 characters"
        )
    values["url"] = _peer_url(values["url"], fail)
    values["key"] = _peer_key(values["key"], fail)
    if values.get("trust", "pinned") not in TRUST_LEVELS:
        raise fail("trust", f"must be one of {', '.join(TRUST_LEVELS)}")
    interval = values.get("pull_interval_s", PeerSettings.pull_interval_s)
    if not MIN_PULL_INTERVAL_S <= interval <= MAX_PULL_INTERVAL_S:
        raise fail(
            "pull_interval_s",
            f"must be between {MIN_PULL_INTERVAL_S:g} and {MAX_PULL_INTERVAL_S:g} seconds",
        )
    for key in _PEER_TYPES:
        if key.endswith(("_per_s", "_burst")):
            v = values.get(key, getattr(PeerSettings, key))
            if not (math.isfinite(v) and v > 0):
                raise fail(key, "must be positive")
    return PeerSettings(**values)


def _peer_url(url: str, fail: Callable[[str, str], ConfigError]) -> str:
    """An http(s) base URL with a host, no query or fragment; made to end with ``/``."""
    if len(url) > MAX_PEER_URL_CHARS - 16:  # room for the path we append
        raise fail("url", f"is longer than {MAX_PEER_URL_CHARS - 16} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise fail("url", f"has {url[:80]!r}, which is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail("url", f"has {url[:80]!r}: expected http://HOST[:PORT]/ or https://...")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise fail("url", f"has {url[:80]!r}: no query, fragment or user info in a peer's base")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise fail("url", "must not contain spaces or control characters")
    return url if url.endswith("/") else url + "/"


def _peer_key(text: str, fail: Callable[[str, str], ConfigError]) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise fail("key", "is not base64 (the peer's Ed25519 public key)") from None
    if len(key) != 32:
        raise fail("key", f"is {len(key)} bytes; an Ed25519 public key is 32")
    return key


def _coerce(value: Any, kind: type, what: str) -> Any:
    # As overflowd.config coerces: true/false never pass for numbers, ints pass for floats.
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be true or false")
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be {'an integer' if kind is int else 'a number'}")
    if kind is float and isinstance(value, int | float):
        return float(value)
    if kind is int:
        if isinstance(value, int):
            return value
        raise ConfigError(f"{what} must be an integer")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{what} must be a string")
    raise ConfigError(f"{what} must be a number")


def _at(source: str, text: str, index: int | None, key: str | None) -> str:
    """'file:line: ' for key ``key`` of the ``index``-th ``[[peers]]`` table, when found."""
    line = _peer_line(text, index, key)
    return f"{source}:{line}: " if line else f"{source}: "


def _peer_line(text: str, index: int | None, key: str | None) -> int | None:
    table = -1
    current: str | None = None
    header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]")
    for number, raw in enumerate(text.splitlines(), start=1):
        m = header.match(raw)
        if m:
            current = m.group(2)
            if current == "peers" and m.group(1) == "[[":
                table += 1
                if index is None or (table == index and key is None):
                    return number
            continue
        if (
            key is not None
            and current == "peers"
            and table == index
            and re.match(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", raw)
        ):
            return number
    return None


# -- the signed node record ---------------------------------------------------------------------

NODE_CONTENT_TYPE = "application/overflowd-node+cbor"
NODE_RECORD_VERSION = 1
#: A record is its key, up to 4 contacts (512 bytes), a point (64 bytes), an endpoint URL and
#: a time: under 1.5 kB at the field limits. Parsing refuses anything longer before decoding.
MAX_NODE_RECORD_BYTES = 4096
MAX_ENDPOINT_BYTES = 512
#: A node record older than this is not taken as the node's word now (re-fetch it); one
#: dated further ahead than ``MAX_RECORD_FUTURE_S`` has a clock we do not believe.
MAX_RECORD_AGE_S = 1 * DAYS
MAX_RECORD_FUTURE_S = 300 * SECONDS

_NODE_KEYS = frozenset({"v", "key", "contacts", "point", "endpoint", "time"})


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What a node says about itself, signed by its key: how to reach it and whom to tell."""

    key: bytes
    contacts: tuple[str, ...]
    #: the observation point, as the node's reports carry it
    point: str
    #: the node's API base URL as it wants peers to use it; "" when it does not say
    endpoint: str
    #: when it was signed, milliseconds since the Unix epoch
    time_ms: int

    @property
    def fingerprint(self) -> str:
        return rpt.key_fingerprint(self.key)


class NodeRecordError(ReportDecodeError):
    """A node record that does not parse (the peer's fault: count it, drop it)."""


def _protected(kid: bytes) -> bytes:
    return bytes(
        cbor2.dumps(
            {rpt.HDR_ALG: rpt.ALG_EDDSA, rpt.HDR_CONTENT_TYPE: NODE_CONTENT_TYPE, rpt.HDR_KID: kid},
            canonical=True,
        )
    )


def _check_record(record: NodeRecord) -> None:
    """ValueError when the record breaks a field limit (the same limits as reports)."""
    if len(record.key) != 32:
        raise ValueError("key must be the 32-byte Ed25519 public key")
    if len(record.contacts) > rpt.MAX_CONTACTS:
        raise ValueError(f"at most {rpt.MAX_CONTACTS} contacts")
    if sum(len(c.encode()) for c in record.contacts) > rpt.MAX_CONTACT_BYTES_TOTAL:
        raise ValueError(f"contacts longer than {rpt.MAX_CONTACT_BYTES_TOTAL} bytes together")
    if len(record.point.encode()) > rpt.MAX_POINT_BYTES:
        raise ValueError(f"point longer than {rpt.MAX_POINT_BYTES} bytes")
    if len(record.endpoint.encode()) > MAX_ENDPOINT_BYTES:
        raise ValueError(f"endpoint longer than {MAX_ENDPOINT_BYTES} bytes")
    if not 0 <= record.time_ms <= rpt.U64:
        raise ValueError("time out of range")


def encode_node_record(record: NodeRecord, sign: rpt.Signer) -> bytes:
    """The COSE_Sign1 bytes of ``record`` signed by ``sign`` (the key ``record.key`` names)."""
    _check_record(record)
    protected = _protected(record.key)
    payload = bytes(
        cbor2.dumps(
            {
                "v": NODE_RECORD_VERSION,
                "key": record.key,
                "contacts": list(record.contacts),
                "point": record.point,
                "endpoint": record.endpoint,
                "time": record.time_ms,
            },
            canonical=True,
        )
    )
    signature = sign(rpt.sig_structure(protected, payload))
    if len(signature) != 64:
        raise ValueError("an Ed25519 signature is 64 bytes")
    return bytes(
        cbor2.dumps(
            cbor2.CBORTag(rpt.COSE_SIGN1_TAG, [protected, {}, payload, signature]), canonical=True
        )
    )


@dataclass(frozen=True, slots=True)
class UnverifiedNodeRecord:
    record: NodeRecord
    to_be_signed: bytes
    signature: bytes


def decode_node_record(data: bytes) -> UnverifiedNodeRecord:
    """Parse a node record without checking its signature; NodeRecordError and nothing else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("a node record is bytes")
    data = bytes(data)
    if len(data) > MAX_NODE_RECORD_BYTES:
        raise NodeRecordError(f"{len(data)} bytes, more than {MAX_NODE_RECORD_BYTES}")
    outer = _loads(data, "node record")
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != rpt.COSE_SIGN1_TAG:
        raise NodeRecordError("not a tagged COSE_Sign1 (tag 18)")
    body = outer.value
    if not isinstance(body, list) or len(body) != 4:
        raise NodeRecordError("COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = body
    if not isinstance(protected, bytes) or not isinstance(payload, bytes):
        raise NodeRecordError("protected header and payload must be byte strings")
    if not isinstance(unprotected, dict) or unprotected:
        raise NodeRecordError("unprotected header must be an empty map")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise NodeRecordError("signature must be 64 bytes")
    if _dumps(outer) != data:
        raise NodeRecordError("COSE_Sign1 is not in canonical encoding")
    header = _loads(protected, "protected header")
    if not isinstance(header, dict) or _dumps(header) != protected:
        raise NodeRecordError("protected header must be a canonical map")
    if rpt.HDR_CRIT in header:
        raise NodeRecordError("critical header parameters are not supported")
    if header.get(rpt.HDR_ALG) != rpt.ALG_EDDSA:
        raise NodeRecordError("algorithm must be EdDSA (-8)")
    if header.get(rpt.HDR_CONTENT_TYPE) != NODE_CONTENT_TYPE:
        raise NodeRecordError(f"content type must be {NODE_CONTENT_TYPE}")
    kid = header.get(rpt.HDR_KID)
    m = _loads(payload, "payload")
    if not isinstance(m, dict) or _dumps(m) != payload:
        raise NodeRecordError("payload must be a map in deterministic CBOR")
    if set(m) != _NODE_KEYS:
        raise NodeRecordError(f"payload must hold exactly {', '.join(sorted(_NODE_KEYS))}")
    if m["v"] != NODE_RECORD_VERSION or isinstance(m["v"], bool):
        raise NodeRecordError(f"version must be {NODE_RECORD_VERSION}")
    key, contacts, point, endpoint, time_ms = (
        m["key"],
        m["contacts"],
        m["point"],
        m["endpoint"],
        m["time"],
    )
    if not isinstance(key, bytes) or key != kid:
        raise NodeRecordError("key must be the 32-byte key the record is signed with (kid)")
    if not (isinstance(contacts, list) and all(isinstance(c, str) for c in contacts)):
        raise NodeRecordError("contacts must be a list of strings")
    if not isinstance(point, str) or not isinstance(endpoint, str):
        raise NodeRecordError("point and endpoint must be strings")
    if not isinstance(time_ms, int) or isinstance(time_ms, bool):
        raise NodeRecordError("time must be an integer")
    record = NodeRecord(
        key=key, contacts=tuple(contacts), point=point, endpoint=endpoint, time_ms=time_ms
    )
    try:
        _check_record(record)
    except ValueError as exc:
        raise NodeRecordError(str(exc)) from None
    return UnverifiedNodeRecord(
        record=record, to_be_signed=rpt.sig_structure(protected, payload), signature=signature
    )


def verify_node_record(
    data: bytes,
    check: rpt.Checker,
    *,
    now_ms: int | None = None,
    max_age_s: float = MAX_RECORD_AGE_S,
    max_future_s: float = MAX_RECORD_FUTURE_S,
) -> NodeRecord:
    """Parse and verify a node record; ``check`` is the Ed25519 verifier (identity.py).

    With ``now_ms``, a record signed longer than ``max_age_s`` ago or dated more than
    ``max_future_s`` ahead raises NodeRecordError too (a replayed record says old things).
    Raises NodeRecordError or :class:`~overflowd.errors.SignatureError`.
    """
    unverified = decode_node_record(data)
    check(unverified.record.key, unverified.to_be_signed, unverified.signature)
    if now_ms is not None:
        why = fresh(
            unverified.record.time_ms, now_ms, max_age_s=max_age_s, max_future_s=max_future_s
        )
        if why is not None:
            raise NodeRecordError(f"node record is {why}")
    return unverified.record


def record_to_json(record: NodeRecord) -> dict[str, Any]:
    """The record's fields for people and scripts (the signed bytes are what to trust)."""
    return {
        "key": base64.b64encode(record.key).decode("ascii"),
        "fingerprint": record.fingerprint,
        "contacts": list(record.contacts),
        "observation_point": record.point,
        "endpoint": record.endpoint,
        "time": rpt.iso_ms(record.time_ms),
    }


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise NodeRecordError(f"{what} is not valid CBOR: {type(exc).__name__}") from None


def _dumps(obj: Any) -> bytes:
    try:
        return bytes(cbor2.dumps(obj, canonical=True))
    except Exception as exc:  # what cbor2 decoded but cannot encode: our decode error
        raise NodeRecordError(f"cannot be re-encoded: {type(exc).__name__}") from None


# -- learned peers ------------------------------------------------------------------------------

#: A learned peer's name: ``learned-`` and its key's fingerprint (a name for logs and tables).
LEARNED_PREFIX = "learned-"


class PeerListError(ValueError):
    """A ``/v1/peers`` answer that is not a list of records at all (the whole list is refused)."""


def parse_peer_list(body: bytes, *, max_records: int = MAX_PEER_RECORDS) -> list[bytes | None]:
    """The records of one ``/v1/peers`` answer (``{"peers": [{"signed": b64url}, ...]}``).

    An entry that is not a base64url string of at most :data:`MAX_NODE_RECORD_BYTES` is None
    (the caller counts it malformed); more than ``max_records`` entries refuses the list.
    """

    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PeerListError("the answer is not JSON") from None
    items = doc.get("peers") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise PeerListError("the answer has no 'peers' list")
    if len(items) > max_records:
        raise PeerListError(f"{len(items)} records, more than {max_records}")
    out: list[bytes | None] = []
    for item in items:
        text = item.get("signed") if isinstance(item, dict) else None
        if not isinstance(text, str) or len(text) > 2 * MAX_NODE_RECORD_BYTES:
            out.append(None)
            continue
        try:
            out.append(rpt.b64url_decode(text))
        except ValueError:
            out.append(None)
    return out


def learned_endpoint(url: str) -> str:
    """A learned peer's API base from its record: an http(s) URL with a host, no query,
    fragment or user info (as ``peers.url``); ValueError saying why not."""
    if not url:
        raise ValueError("the record names no endpoint")
    try:
        return _peer_url(url, lambda key, why: ConfigError(f"endpoint {why}"))
    except ConfigError as exc:  # a peer's words, not the operator's file
        raise ValueError(str(exc)) from None


def learned_peer(record: NodeRecord, url: str, interval_s: float = 1 * MINUTES) -> PeerSettings:
    """The settings of a peer learned from ``record``: the lowest trust, pulled, never pushed
    to (we owe a stranger nothing; its reports still carry their observers' signatures)."""
    return PeerSettings(
        name=LEARNED_PREFIX + record.fingerprint,
        url=url,
        key=record.key,
        trust=TRUST_LEVELS[0],
        push=False,
        pull=True,
        pull_interval_s=interval_s,
    )


def peers_by_key(peers: Sequence[PeerSettings]) -> Mapping[bytes, PeerSettings]:
    """The configured peers by their key (the inbox finds a sender this way)."""
    return {p.key: p for p in peers}


def relayed_trust(peer: PeerSettings, observer_key: bytes, observer_trust: str) -> str:
    """The trust label of a report a peer brought (pushed or pulled): the observer's own, from
    this node's trust book, never the carrier's, because a peer is trusted to carry reports,
    not to vouch for them. Only what the peer observed itself may take the peer's trust."""
    rank = {level: i for i, level in enumerate(TRUST_LEVELS)}
    if observer_key == peer.key and rank.get(peer.trust, 0) > rank.get(observer_trust, 0):
        return peer.trust
    return observer_trust
