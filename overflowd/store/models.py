"""The tables of the report store, as SQLAlchemy Core tables.

Core ``Table`` objects rather than the ORM's declarative classes: every store module reads and
writes through Core statements on ``Base.metadata.tables``, and the classes and their mappers
pulled ``sqlalchemy.orm`` into the daemon for nothing (~7 MB of an idle node, issue #16).

These tables describe the schema *as the migrations leave it*; the migrations in
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
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

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


def column(name: str, type_: Any, *, nullable: bool = False, **kw: Any) -> Column[Any]:
    """A column, NOT NULL unless said (what the declarative models' ``Mapped[T]`` gave; ``T |
    None`` was ``nullable=True``): the migrations built them so, and a test compares."""
    return Column(name, type_, nullable=nullable, **kw)


#: Every table below; Alembic's env.py and the tests read it as ``Base.metadata``.
METADATA = MetaData(naming_convention=NAMING_CONVENTION)


class Base:
    """The name every store module reads the tables by (``Base.metadata.tables["reports"]``),
    kept from the declarative models these tables replace: no mapped class, no ORM."""

    metadata = METADATA


#: One signed report, stored once whatever path it arrived by (``via``).
REPORTS = Table(
    "reports",
    METADATA,
    #: lowercase hex SHA-256 of ``cose`` (:func:`overflowd.report.report_id`)
    column("id", String(64), primary_key=True),
    column("cose", LargeBinary),
    column("observer_key", LargeBinary(32)),
    column("kind", String(32)),
    column("ip_version", Integer),
    column("src", LargeBinary(16)),
    column("dst", LargeBinary(16)),
    column("proto", Integer),
    column("sport", Integer),
    column("dport", Integer),
    column("packets", BigInteger),
    column("bytes", BigInteger),
    column("first_ms", BigInteger),
    column("last_ms", BigInteger),
    column("tcp_flags", Integer),
    column("tos", Integer),
    column("src_as", BigInteger, nullable=True),
    column("dst_as", BigInteger, nullable=True),
    column("report_time_ms", BigInteger),
    column("probability", Double),
    column("sampling_format", String(24)),
    column("sampling_interval", BigInteger),
    column("sampling_provenance", String(16)),
    column("received_ms", BigInteger, index=True),
    #: how it reached us: 'local', 'udp', 'webhook', 'import' or 'gossip'
    column("via", String(16)),
    #: the observer's trust when it arrived ('pinned', 'dns', 'continuity', 'unknown');
    #: NULL for our own reports and for reports stored before revision 0003
    column("trust", String(16), nullable=True),
    #: the /24 or /48 the report reached us from (storage budgets per sender network);
    #: NULL for our own reports, and where the path has no sender address
    column("sender_net", String(43), nullable=True),
    #: this node's own number for the report, given when it was first stored and strictly
    #: increasing in commit order (``report_sequence``): the cursor of every reader that pages
    #: through reports (peers, ``--follow``); never a timestamp, which many share
    column("seq", BigInteger, unique=True),
    #: the fewest peer-to-peer hops it made to reach us (0: not through a peer; the
    #: inbox's ``hops``); what it is forwarded with, plus one
    column("hops", Integer, server_default="0"),
    # Computed from the columns above when the row is written (derived_columns), so that `top`
    # groups and adds stored numbers instead of evaluating expressions per report (revision
    # 0010_top_keys; docs/query.md "How fast"). NULL only in rows written before it.
    #: the source's /24 (IPv4) or /48 (IPv6) as one integer, ordered as (ip_version, prefix)
    column("src_key", BigInteger, nullable=True),
    column("dst_key", BigInteger, nullable=True),
    #: the Horvitz-Thompson weight packets·interval/p of a p < 1 report (+inf over WEIGHT_CAP);
    #: NULL when p = 1 (a certain report)
    column("packets_weight", Double, nullable=True),
    column("bytes_weight", Double, nullable=True),
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

#: One way a report reached this node, and how often: the report is stored once, every arrival
#: is counted here (duplicates included), so an operator sees a report that came by UDP, by
#: webhook and from three peers as one report with five channels.
#:
#: ``channel`` is ``local``, ``udp``, ``webhook``, ``import`` or ``peer:<fingerprint>`` of the
#: peer it came from (``peer`` for gossip stored before revision 0007_arrivals). Rows per report
#: are bounded by construction: four fixed channels plus one per configured peer.
REPORT_ARRIVALS = Table(
    "report_arrivals",
    METADATA,
    column("report_id", String(64), primary_key=True),
    column("channel", String(64), primary_key=True),
    column("count", BigInteger),
    column("first_ms", BigInteger),
    column("last_ms", BigInteger),
)

#: The last report sequence number given out: one row, updated in each storing transaction.
#:
#: Updating it takes the row's lock (PostgreSQL) or the database's write lock (SQLite) until the
#: transaction ends, so a writer gets its numbers only after the writer before it has committed
#: or rolled back: numbers become visible in order, and a reader that has seen ``n`` will never
#: later find a new report numbered below ``n``.
REPORT_SEQUENCE = Table(
    "report_sequence",
    METADATA,
    column("name", String(16), primary_key=True),
    column("last", BigInteger),
)

#: One observer key we hold reports from, with what its latest report said about it.
OBSERVERS = Table(
    "observers",
    METADATA,
    column("key", LargeBinary(32), primary_key=True),
    column("fingerprint", String(19)),
    #: JSON array of contact URIs, from the most recently received report
    column("contacts", Text),
    column("point", String(64)),
    column("first_seen_ms", BigInteger),
    column("last_seen_ms", BigInteger),
    #: how many distinct reports of this observer are stored
    column("reports", BigInteger),
    #: since when the daemon's trust book has seen these contacts unchanged; NULL when unknown
    #: (not written yet, or a newer report brought other contacts)
    column("contacts_since_ms", BigInteger, nullable=True),
    #: the largest weights n·k/p and b·k/p of its p < 1 reports ever stored (inf allowed): what
    #: one report it did not send could have weighed, the unit of its estimates' intervals
    #: (docs/estimates.md); NULL while it has none. Kept when reports are pruned: only wider.
    column("packets_unit", Double, nullable=True),
    column("bytes_unit", Double, nullable=True),
)

#: A /24 or /48 network an observer key's reports reached us from (trust continuity).
#:
#: Written by the daemon in batches (:mod:`overflowd.store.continuity`), at most
#: ``MAX_NETWORKS_PER_KEY`` rows per key: the least recently seen are deleted first, so a flood
#: of spoofed sources cannot grow the table without limit.
OBSERVER_NETWORKS = Table(
    "observer_networks",
    METADATA,
    column("key", LargeBinary(32), primary_key=True),
    #: "192.0.2.0/24" or "2001:db8:1::/48" (43 characters hold any IPv6 prefix)
    column("network", String(43), primary_key=True),
    column("first_seen_ms", BigInteger),
    column("last_seen_ms", BigInteger),
    column("reports", BigInteger),
)

#: One webhook delivery of one report to one URL: pending, delivered, or dead (kept).
#:
#: The row holds the report's COSE bytes, enough to rebuild the body and sign fresh headers at
#: every attempt (a signature older than the receiver's 300 s window would be refused), so the
#: outbox does not depend on the ``reports`` table. ``next_attempt_ms`` is also the lease: a
#: worker that claims a row pushes it into the future, so a crashed worker's rows come due again
#: when the lease runs out. ``(report_id, url)`` is unique: enqueueing twice is a no-op.
WEBHOOK_OUTBOX = Table(
    "webhook_outbox",
    METADATA,
    column("id", Integer, primary_key=True, autoincrement=True),
    column("report_id", String(64)),
    column("url", String(2048)),
    column("cose", LargeBinary),
    #: 'pending', 'delivered' or 'dead'
    column("state", String(16)),
    column("attempts", Integer),
    column("next_attempt_ms", BigInteger),
    column("created_ms", BigInteger),
    column("updated_ms", BigInteger),
    column("last_status", Integer, nullable=True),
    column("last_error", String(400), nullable=True),
    #: 'webhook' (a webhook endpoint's delivery) or 'peer' (a push to a peer's inbox): the
    #: same machinery, claimed by different workers
    column("kind", String(8), server_default="webhook"),
    UniqueConstraint("report_id", "url"),
    Index("ix_webhook_outbox_state_next_attempt_ms", "state", "next_attempt_ms"),
)

#: What we learnt about a webhook URL: disabled (410 Gone), or asked us to slow down.
WEBHOOK_ENDPOINTS = Table(
    "webhook_endpoints",
    METADATA,
    column("url", String(2048), primary_key=True),
    #: when it answered 410 Gone; NULL while enabled
    column("disabled_ms", BigInteger, nullable=True),
    column("disabled_reason", String(400), nullable=True),
    #: no request to this URL before this time (Retry-After, 429/503); 0 for none
    column("not_before_ms", BigInteger),
    column("updated_ms", BigInteger),
)

#: Something about an observer the operator should look at (:mod:`overflowd.trust` events).
#:
#: ``kind`` is ``new_key`` (a key never seen before, for an observer known by its contacts or
#: label) or ``contacts_changed`` (a known key now sends other contacts). Contacts are JSON
#: arrays; for ``new_key``, ``old_contacts`` are those of the keys it is related to.
OBSERVER_EVENTS = Table(
    "observer_events",
    METADATA,
    column("id", Integer, primary_key=True, autoincrement=True),
    column("kind", String(32)),
    column("key", LargeBinary(32)),
    column("old_contacts", Text),
    column("new_contacts", Text),
    #: one of the keys involved is pinned: look now
    column("pinned", Boolean),
    column("at_ms", BigInteger, index=True),
    #: the address the report came from, when known
    column("sender", String(64), nullable=True),
    #: for people: why the key is related, and the previous keys' fingerprints
    column("detail", String(400), nullable=True),
)

#: What this node knows of one peer (:mod:`overflowd.store.peers`), durable across restarts.
#:
#: ``pull_cursor`` is the peer's own report number (its ``/v1/reports`` ``next``) up to which
#: every report it served is stored here; ``push_cursor`` is *our* report number up to which ours
#: were handed to its inbox queue. Both only move forward, except that a peer whose store was
#: reset (it answers 409 to our cursor) is pulled from 0 again.
PEER_STATE = Table(
    "peer_state",
    METADATA,
    #: the peer's Ed25519 public key
    column("key", LargeBinary(32), primary_key=True),
    column("name", String(64)),
    column("url", String(2048)),
    column("pull_cursor", BigInteger),
    column("push_cursor", BigInteger),
    #: the last time the peer answered (a pull page, an inbox delivery); NULL: never
    column("last_contact_ms", BigInteger, nullable=True),
    column("last_error", String(400), nullable=True),
    column("last_error_ms", BigInteger, nullable=True),
    #: reports stored from it (new to us), sent to it, and received from it that we had
    column("reports_in", BigInteger),
    column("reports_out", BigInteger),
    column("duplicates", BigInteger),
    column("score", Double),
    #: no exchange with it before this time; NULL: not banned
    column("banned_until_ms", BigInteger, nullable=True),
    column("ban_count", Integer),
    column("ban_reason", String(400), nullable=True),
    #: learned from another node's signed record, not configured
    column("learned", Boolean),
    column("created_ms", BigInteger),
    column("updated_ms", BigInteger),
)

#: The latest signed node record a peer served at its ``/v1/identity``, kept verbatim
#: (docs/peers.md "Learned peers"): ``GET /v1/peers`` hands these on so that a node's peers can
#: learn of each other. One row per peer key, replaced at each pull round.
PEER_RECORDS = Table(
    "peer_records",
    METADATA,
    #: the peer's Ed25519 public key (the record's own key: checked before it is stored)
    column("key", LargeBinary(32), primary_key=True),
    #: the COSE_Sign1 bytes as served (at most peers.MAX_NODE_RECORD_BYTES)
    column("record", LargeBinary(4096)),
    #: the record's own signing time, and when we fetched it
    column("record_ms", BigInteger),
    column("fetched_ms", BigInteger),
)

#: A prefix a peer subscribed to (docs/peers.md "Subscriptions"): the reports whose source or
#: destination is inside it go to ``endpoint`` (the subscriber's inbox). Accepted only when the
#: prefix's ``_overflowd`` record names the subscriber's key.
PEER_SUBSCRIPTIONS = Table(
    "peer_subscriptions",
    METADATA,
    #: the subscriber's Ed25519 public key (a configured peer's)
    column("subscriber", LargeBinary(32), primary_key=True),
    #: the prefix in its canonical text form (``192.0.2.0/24``)
    column("prefix", String(43), primary_key=True),
    column("endpoint", String(2048)),
    column("created_ms", BigInteger),
    column("updated_ms", BigInteger),
)
