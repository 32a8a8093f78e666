"""The tables of the report store, as SQLAlchemy 2 typed declarative models.

These classes describe the schema *as the migrations leave it*; the migrations in
``migrations/versions`` are what create and change tables, never ``metadata.create_all``. A test
compares the two so they cannot drift apart.

Choices that the queries rely on:

* ``src`` and ``dst`` are 16-byte big-endian addresses, IPv4 stored IPv4-mapped
  (``::ffff:a.b.c.d``), so "every report about 192.0.2.0/24" is the range query
  ``lo <= src <= hi`` on an ordinary index, the same on SQLite (memcmp on BLOBs) and PostgreSQL
  (bytea compares bytewise). ``ip_version`` keeps the family the report was signed with, so an
  IPv6 prefix such as ``::/0`` never returns IPv4 reports, and a genuine IPv6 report about
  ``::ffff:192.0.2.1`` is not mistaken for an IPv4 one.
* The signed bytes (``cose``) are kept verbatim: they are the report; every other column is an
  index over them. Counters and times that the protocol allows up to 2**64-1 (``packets``,
  ``bytes``, ``first_ms``, ``last_ms``, ``report_time_ms``) are stored *saturated* at 2**63-1,
  the largest value a signed 64-bit column holds on both backends. No real flow comes near
  (2**63 packets, or a time 292 million years from now); the exact value is still in ``cose``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from overflowd.store.base import BIGINT_MAX as _BIGINT_MAX

#: Constraint and index names fixed by convention, so migrations can refer to them by name on
#: every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: The largest value a BIGINT column holds; u64 protocol fields saturate here (defined beside
#: the report filter, which imports no SQLAlchemy: overflowd.store.base).
BIGINT_MAX = _BIGINT_MAX

#: A report whose weight n·k/p (or b·k/p) is above this counts as unbounded (its estimate is
#: infinite) instead of entering the sums: PostgreSQL raises on a float8 overflow where SQLite
#: and Python give inf, and Σw² of a few weights near 1e154 would overflow. 1e140 keeps Σw² of
#: 1e20 reports finite; a real flow weighs 1/rate (1e4 at the default rate), so only an
#: observer claiming p < 1e-112 for an ordinary flow ever reaches it.
WEIGHT_CAP = 1e140
#: ``src_key``/``dst_key`` of an IPv6 address: this plus its first 48 bits (an IPv4 key is its
#: first 24 bits, below 2**24): IPv4 keys sort before IPv6 ones, each family in address order.
V6_KEY_BASE = 1 << 48


def prefix_key(version: int, address: bytes) -> int:
    """The /24 (IPv4, stored IPv4-mapped) or /48 (IPv6) of a 16-byte stored address, as the
    integer ``src_key``/``dst_key`` hold."""
    if version == 4:
        return int.from_bytes(address[12:15], "big")
    return V6_KEY_BASE | int.from_bytes(address[:6], "big")


def report_weight(amount: int, probability: float, interval: int) -> float | None:
    """``packets_weight``/``bytes_weight``: amount·interval/p for p < 1, in the same
    floating-point operations as the SQL it replaces (overflowd.store.query), +inf when over
    WEIGHT_CAP; None for a certain report (p = 1)."""
    if not probability < 1.0:
        return None
    scaled = float(amount) * float(interval)
    if scaled > probability * WEIGHT_CAP:
        return float("inf")
    return scaled / probability


def derived_columns(row: dict[str, Any]) -> dict[str, Any]:
    """Set a reports row's computed columns (src_key, dst_key, packets_weight, bytes_weight)
    from its own ip_version, src, dst, packets, bytes, probability and sampling_interval;
    returns the row. Whatever writes a reports row calls it after the row's last change."""
    version, p, k = int(row["ip_version"]), float(row["probability"]), int(row["sampling_interval"])
    row["src_key"] = prefix_key(version, row["src"])
    row["dst_key"] = prefix_key(version, row["dst"])
    row["packets_weight"] = report_weight(int(row["packets"]), p, k)
    row["bytes_weight"] = report_weight(int(row["bytes"]), p, k)
    return row


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ReportModel(Base):
    """One signed report, stored once whatever path it arrived by (``via``)."""

    __tablename__ = "reports"
    __table_args__ = (
        #: oldest-first pruning of one kind (own: via = 'local'; received: the rest)
        Index("ix_reports_via_received_ms", "via", "received_ms"),
        # The query filters (migration 0007_query; docs/storage.md "Queries"): flow time on
        # its own, each equality filter with last_ms (select and order newest-first at once).
        #: covering what who/top read of a time window: they never touch the (~1 kB) rows
        Index(
            "ix_reports_last_ms_covering",
            "last_ms",
            "observer_key",
            "ip_version",
            "src",
            "dst",
            "first_ms",
            "packets",
            "bytes",
            "probability",
            "sampling_interval",
            # top's grouping keys and weights (revision 0010_top_keys)
            "src_key",
            "dst_key",
            "packets_weight",
            "bytes_weight",
        ),
        Index("ix_reports_first_ms", "first_ms"),
        Index("ix_reports_src_last_ms", "src", "last_ms"),
        #: covering what who and the victim view read of one destination (0009_dash)
        Index(
            "ix_reports_dst_covering",
            "dst",
            "last_ms",
            "observer_key",
            "ip_version",
            "src",
            "first_ms",
            "packets",
            "bytes",
            "probability",
            "sampling_interval",
        ),
        #: an observer's reports, and its latest one (its current trust label) in one probe
        Index("ix_reports_observer_key_received_ms", "observer_key", "received_ms"),
        Index("ix_reports_proto_last_ms", "proto", "last_ms"),
        Index("ix_reports_sport_last_ms", "sport", "last_ms"),
        Index("ix_reports_dport_last_ms", "dport", "last_ms"),
        Index("ix_reports_kind_last_ms", "kind", "last_ms"),
        Index("ix_reports_trust", "trust"),
    )

    #: lowercase hex SHA-256 of ``cose`` (:func:`overflowd.report.report_id`)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    cose: Mapped[bytes] = mapped_column(LargeBinary)
    observer_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    kind: Mapped[str] = mapped_column(String(32))
    ip_version: Mapped[int] = mapped_column(Integer)
    src: Mapped[bytes] = mapped_column(LargeBinary(16))
    dst: Mapped[bytes] = mapped_column(LargeBinary(16))
    proto: Mapped[int] = mapped_column(Integer)
    sport: Mapped[int] = mapped_column(Integer)
    dport: Mapped[int] = mapped_column(Integer)
    packets: Mapped[int] = mapped_column(BigInteger)
    # the column is 'bytes'; the attribute may not shadow the builtin inside this class body
    octets: Mapped[int] = mapped_column("bytes", BigInteger)
    first_ms: Mapped[int] = mapped_column(BigInteger)
    last_ms: Mapped[int] = mapped_column(BigInteger)
    tcp_flags: Mapped[int] = mapped_column(Integer)
    tos: Mapped[int] = mapped_column(Integer)
    src_as: Mapped[int | None] = mapped_column(BigInteger)
    dst_as: Mapped[int | None] = mapped_column(BigInteger)
    report_time_ms: Mapped[int] = mapped_column(BigInteger)
    probability: Mapped[float] = mapped_column(Double)
    sampling_format: Mapped[str] = mapped_column(String(24))
    sampling_interval: Mapped[int] = mapped_column(BigInteger)
    sampling_provenance: Mapped[str] = mapped_column(String(16))
    received_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    #: how it reached us: 'local', 'udp', 'webhook', 'import' or 'gossip'
    via: Mapped[str] = mapped_column(String(16))
    #: the observer's trust when it arrived ('pinned', 'dns', 'continuity', 'unknown');
    #: NULL for our own reports and for reports stored before revision 0003
    trust: Mapped[str | None] = mapped_column(String(16))
    #: the /24 or /48 the report reached us from (storage budgets per sender network);
    #: NULL for our own reports, and where the path has no sender address
    sender_net: Mapped[str | None] = mapped_column(String(43))
    #: this node's own number for the report, given when it was first stored and strictly
    #: increasing in commit order (:class:`ReportSequenceModel`): the cursor of every reader
    #: that pages through reports (peers, ``--follow``); never a timestamp, which many share
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    #: the fewest peer-to-peer hops it made to reach us (0: not through a peer; the
    #: inbox's ``hops``); what it is forwarded with, plus one
    hops: Mapped[int] = mapped_column(Integer, server_default="0")
    # Computed from the columns above when the row is written (derived_columns), so that `top`
    # groups and adds stored numbers instead of evaluating expressions per report (revision
    # 0010_top_keys; docs/query.md "How fast"). NULL only in rows written before it.
    #: the source's /24 (IPv4) or /48 (IPv6) as one integer, ordered as (ip_version, prefix)
    src_key: Mapped[int | None] = mapped_column(BigInteger)
    dst_key: Mapped[int | None] = mapped_column(BigInteger)
    #: the Horvitz-Thompson weight packets·interval/p of a p < 1 report (+inf over WEIGHT_CAP);
    #: NULL when p = 1 (a certain report)
    packets_weight: Mapped[float | None] = mapped_column(Double)
    bytes_weight: Mapped[float | None] = mapped_column(Double)


class ReportArrivalModel(Base):
    """One way a report reached this node, and how often: the report is stored once, every
    arrival is counted here (duplicates included), so an operator sees a report that came by
    UDP, by webhook and from three peers as one report with five channels.

    ``channel`` is ``local``, ``udp``, ``webhook``, ``import`` or ``peer:<fingerprint>`` of
    the peer it came from (``peer`` for gossip stored before revision 0007_arrivals). Rows per
    report are bounded by construction: four fixed channels plus one per configured peer.
    """

    __tablename__ = "report_arrivals"

    report_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    first_ms: Mapped[int] = mapped_column(BigInteger)
    last_ms: Mapped[int] = mapped_column(BigInteger)


class ReportSequenceModel(Base):
    """The last report sequence number given out: one row, updated in each storing transaction.

    Updating it takes the row's lock (PostgreSQL) or the database's write lock (SQLite) until
    the transaction ends, so a writer gets its numbers only after the writer before it has
    committed or rolled back: numbers become visible in order, and a reader that has seen
    ``n`` will never later find a new report numbered below ``n``.
    """

    __tablename__ = "report_sequence"

    name: Mapped[str] = mapped_column(String(16), primary_key=True)
    last: Mapped[int] = mapped_column(BigInteger)


class ObserverModel(Base):
    """One observer key we hold reports from, with what its latest report said about it."""

    __tablename__ = "observers"

    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(19))
    #: JSON array of contact URIs, from the most recently received report
    contacts: Mapped[str] = mapped_column(Text)
    point: Mapped[str] = mapped_column(String(64))
    first_seen_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_ms: Mapped[int] = mapped_column(BigInteger)
    #: how many distinct reports of this observer are stored
    reports: Mapped[int] = mapped_column(BigInteger)
    #: since when the daemon's trust book has seen these contacts unchanged; NULL when unknown
    #: (not written yet, or a newer report brought other contacts)
    contacts_since_ms: Mapped[int | None] = mapped_column(BigInteger)
    #: the largest weights n·k/p and b·k/p of its p < 1 reports ever stored (inf allowed): what
    #: one report it did not send could have weighed, the unit of its estimates' intervals
    #: (docs/estimates.md); NULL while it has none. Kept when reports are pruned: only wider.
    packets_unit: Mapped[float | None] = mapped_column(Double)
    bytes_unit: Mapped[float | None] = mapped_column(Double)


class ObserverNetworkModel(Base):
    """A /24 or /48 network an observer key's reports reached us from (trust continuity).

    Written by the daemon in batches (:mod:`overflowd.store.continuity`), at most
    ``MAX_NETWORKS_PER_KEY`` rows per key: the least recently seen are deleted first, so a
    flood of spoofed sources cannot grow the table without limit.
    """

    __tablename__ = "observer_networks"

    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    #: "192.0.2.0/24" or "2001:db8:1::/48" (43 characters hold any IPv6 prefix)
    network: Mapped[str] = mapped_column(String(43), primary_key=True)
    first_seen_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_ms: Mapped[int] = mapped_column(BigInteger)
    reports: Mapped[int] = mapped_column(BigInteger)


class WebhookOutboxModel(Base):
    """One webhook delivery of one report to one URL: pending, delivered, or dead (kept).

    The row holds the report's COSE bytes, enough to rebuild the body and sign fresh headers at
    every attempt (a signature older than the receiver's 300 s window would be refused), so the
    outbox does not depend on the ``reports`` table. ``next_attempt_ms`` is also the lease: a
    worker that claims a row pushes it into the future, so a crashed worker's rows come due
    again when the lease runs out. ``(report_id, url)`` is unique: enqueueing twice is a no-op.
    """

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        UniqueConstraint("report_id", "url"),
        Index("ix_webhook_outbox_state_next_attempt_ms", "state", "next_attempt_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    cose: Mapped[bytes] = mapped_column(LargeBinary)
    #: 'pending', 'delivered' or 'dead'
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_ms: Mapped[int] = mapped_column(BigInteger)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(400))
    #: 'webhook' (a webhook endpoint's delivery) or 'peer' (a push to a peer's inbox): the
    #: same machinery, claimed by different workers
    kind: Mapped[str] = mapped_column(String(8), server_default="webhook")


class WebhookEndpointModel(Base):
    """What we learnt about a webhook URL: disabled (410 Gone), or asked us to slow down."""

    __tablename__ = "webhook_endpoints"

    url: Mapped[str] = mapped_column(String(2048), primary_key=True)
    #: when it answered 410 Gone; NULL while enabled
    disabled_ms: Mapped[int | None] = mapped_column(BigInteger)
    disabled_reason: Mapped[str | None] = mapped_column(String(400))
    #: no request to this URL before this time (Retry-After, 429/503); 0 for none
    not_before_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


class ObserverEventModel(Base):
    """Something about an observer the operator should look at (:mod:`overflowd.trust` events).

    ``kind`` is ``new_key`` (a key never seen before, for an observer known by its contacts or
    label) or ``contacts_changed`` (a known key now sends other contacts). Contacts are JSON
    arrays; for ``new_key``, ``old_contacts`` are those of the keys it is related to.
    """

    __tablename__ = "observer_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[bytes] = mapped_column(LargeBinary(32))
    old_contacts: Mapped[str] = mapped_column(Text)
    new_contacts: Mapped[str] = mapped_column(Text)
    #: one of the keys involved is pinned: look now
    pinned: Mapped[bool] = mapped_column(Boolean)
    at_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    #: the address the report came from, when known
    sender: Mapped[str | None] = mapped_column(String(64))
    #: for people: why the key is related, and the previous keys' fingerprints
    detail: Mapped[str | None] = mapped_column(String(400))


class PeerStateModel(Base):
    """What this node knows of one peer (:mod:`overflowd.store.peers`), durable across restarts.

    ``pull_cursor`` is the peer's own report number (its ``/v1/reports`` ``next``) up to which
    every report it served is stored here; ``push_cursor`` is *our* report number up to which
    ours were handed to its inbox queue. Both only move forward, except that a peer whose store
    was reset (it answers 409 to our cursor) is pulled from 0 again.
    """

    __tablename__ = "peer_state"

    #: the peer's Ed25519 public key
    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    pull_cursor: Mapped[int] = mapped_column(BigInteger)
    push_cursor: Mapped[int] = mapped_column(BigInteger)
    #: the last time the peer answered (a pull page, an inbox delivery); NULL: never
    last_contact_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_error: Mapped[str | None] = mapped_column(String(400))
    last_error_ms: Mapped[int | None] = mapped_column(BigInteger)
    #: reports stored from it (new to us), sent to it, and received from it that we had
    reports_in: Mapped[int] = mapped_column(BigInteger)
    reports_out: Mapped[int] = mapped_column(BigInteger)
    duplicates: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Double)
    #: no exchange with it before this time; NULL: not banned
    banned_until_ms: Mapped[int | None] = mapped_column(BigInteger)
    ban_count: Mapped[int] = mapped_column(Integer)
    ban_reason: Mapped[str | None] = mapped_column(String(400))
    #: learned from another node's signed record, not configured
    learned: Mapped[bool] = mapped_column(Boolean)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


class PeerRecordModel(Base):
    """The latest signed node record a peer served at its ``/v1/identity``, kept verbatim
    (docs/peers.md "Learned peers"): ``GET /v1/peers`` hands these on so that a node's peers
    can learn of each other. One row per peer key, replaced at each pull round."""

    __tablename__ = "peer_records"

    #: the peer's Ed25519 public key (the record's own key: checked before it is stored)
    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    #: the COSE_Sign1 bytes as served (at most peers.MAX_NODE_RECORD_BYTES)
    record: Mapped[bytes] = mapped_column(LargeBinary(4096))
    #: the record's own signing time, and when we fetched it
    record_ms: Mapped[int] = mapped_column(BigInteger)
    fetched_ms: Mapped[int] = mapped_column(BigInteger)


class PeerSubscriptionModel(Base):
    """A prefix a peer subscribed to (docs/peers.md "Subscriptions"): the reports whose source
    or destination is inside it go to ``endpoint`` (the subscriber's inbox). Accepted only when
    the prefix's ``_overflowd`` record names the subscriber's key."""

    __tablename__ = "peer_subscriptions"

    #: the subscriber's Ed25519 public key (a configured peer's)
    subscriber: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    #: the prefix in its canonical text form (``192.0.2.0/24``)
    prefix: Mapped[str] = mapped_column(String(43), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(2048))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
