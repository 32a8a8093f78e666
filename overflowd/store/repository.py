"""The report store: signed reports and their observers, in SQLite or PostgreSQL.

Sync by design: SQLAlchemy's engine blocks, so trio services call in through
``trio.to_thread.run_sync``. Every method may be called from several threads at once; each call
takes its own pooled connection and its own transaction.

This is the one module that talks to SQLAlchemy, the database drivers and Alembic at run time.
Whatever they raise leaves here as :class:`~overflowd.errors.StoreError`, one line naming the
database (password masked) and why. Misuse (an unknown ``via``, a negative limit) is a bug in
the caller and raises ``ValueError``/``TypeError`` as usual. It must never log report bodies or
database passwords.

De-duplication belongs to the database, not to us: the report id (SHA-256 of the COSE bytes) is
the primary key and every insert is ``INSERT .. ON CONFLICT (id) DO NOTHING .. RETURNING id`` on
both backends, so when two threads, two processes or two nodes sharing a PostgreSQL server store
the same report at once, exactly one of them is told it is new. (On SQLite we use the
``ON CONFLICT`` upsert clause rather than ``INSERT OR IGNORE``: the latter would also swallow
NOT NULL violations, hiding bugs instead of failing.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    Insert,
    RowMapping,
    Table,
    and_,
    case,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.dml import ReturningInsert

from overflowd import report as rpt
from overflowd.errors import StoreError
from overflowd.store.base import default_url as default_url  # re-exported: callers import it here
from overflowd.store.base import stored_signed_report
from overflowd.store.models import BIGINT_MAX, Base, derived_columns

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql as pg_dialect
    from sqlalchemy.dialects import sqlite as sqlite_dialect

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The paths a report can reach the store by.
VIAS = frozenset({"local", "udp", "webhook", "import", "gossip"})

#: SQLite waits this long for another writer's lock before giving up (PRAGMA busy_timeout).
SQLITE_BUSY_TIMEOUT_MS = 10 * 1000
#: Connecting to PostgreSQL gives up after this long (libpq connect_timeout, whole seconds).
POSTGRES_CONNECT_TIMEOUT_S = 10

#: Held (transaction-scoped) while migrating, so that nodes starting together against one fresh
#: PostgreSQL database do not race to create the same tables. An arbitrary fixed 63-bit number.
_MIGRATION_LOCK_ID = 0x6F766572666C6F77  # "overflow"
_MIGRATING = threading.Lock()

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The newest migration's revision id. Opening a database already at this revision skips
#: importing Alembic (0.6 s of a CLI's start-up); a unit test keeps it equal to Alembic's head.
SCHEMA_HEAD = "0011_q10_visibility"
_BACKENDS = ("sqlite", "postgresql")

#: Ids per UPDATE in update_trust: well under SQLite's 32,766 bound parameters.
_UPDATE_CHUNK = 500

_REPORTS: Table = Base.metadata.tables["reports"]
_OBSERVERS: Table = Base.metadata.tables["observers"]
_SEQUENCE: Table = Base.metadata.tables["report_sequence"]
_ARRIVALS: Table = Base.metadata.tables["report_arrivals"]
#: The arrival channel of each ``via`` when the caller names none (gossip names its peer:
#: ``peer:<fingerprint>``, see :func:`peer_channel`).
_VIA_CHANNEL = {
    "local": "local",
    "udp": "udp",
    "webhook": "webhook",
    "import": "import",
    "gossip": "peer",
}
#: The longest channel name (the column's size): "peer:" and a 19-character fingerprint fit.
MAX_CHANNEL_CHARS = 64
#: The one row of report_sequence (a name, so other sequences can join it later).
_REPORTS_SEQUENCE = "reports"
#: The most reports one page of :meth:`Store.reports_after` returns.
MAX_PAGE_REPORTS = 10_000
#: The largest report number (``reports.seq`` is a signed 64-bit column): a cursor beyond it
#: is no cursor this store gave, and would not even bind as a query parameter.
MAX_SEQ = 2**63 - 1


class CursorAhead(ValueError):
    """A cursor above every number this store has given: not one of its cursors (the database
    was recreated, or restored from an older copy). Paging on from it would skip every report
    numbered below it, silently; the reader must start again (from 0, or its last report)."""

    def __init__(self, after: int, last: int) -> None:
        super().__init__(f"after {after} is beyond this store's last report number {last}")
        self.after = after
        self.last = last


# IPv4 is stored IPv4-mapped (RFC 4291 §2.5.5.2) so both families share one 16-byte keyspace,
# and an IPv4 prefix is a range inside ::ffff:0:0/96.
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


# ---------------------------------------------------------------------------------------------
# Address keys


def address_to_key(addr: Address) -> bytes:
    """The 16-byte big-endian column value for ``addr``; IPv4 becomes ``::ffff:a.b.c.d``."""
    if isinstance(addr, ipaddress.IPv4Address):
        return _V4_MAPPED_PREFIX + addr.packed
    if isinstance(addr, ipaddress.IPv6Address):
        return addr.packed
    raise TypeError(f"expected an IPv4Address or IPv6Address, not {type(addr).__name__}")


def key_to_address(key: bytes) -> Address:
    """Inverse of :func:`address_to_key`: ``::ffff:a.b.c.d`` comes back as IPv4 ``a.b.c.d``."""
    if len(key) != 16:
        raise ValueError(f"an address key is 16 bytes, not {len(key)}")
    if key[:12] == _V4_MAPPED_PREFIX:
        return ipaddress.IPv4Address(key[12:])
    return ipaddress.IPv6Address(key)


def network_range(net: Network) -> tuple[bytes, bytes]:
    """Inclusive ``(lo, hi)`` keys of every address in ``net``; ``lo <= key <= hi`` selects it.

    Byte strings of equal length compare like the big-endian numbers they spell, on SQLite
    (memcmp on BLOBs) and PostgreSQL (bytea) alike, so this is an index range scan.
    """
    if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise TypeError(f"expected an IPv4Network or IPv6Network, not {type(net).__name__}")
    return address_to_key(net.network_address), address_to_key(net.broadcast_address)


def _saturate(value: int) -> int:
    # u64 protocol fields in a signed BIGINT column; see models.py for why this loses nothing real.
    return min(value, BIGINT_MAX)


# ---------------------------------------------------------------------------------------------
# Values handed out


@dataclass(frozen=True, slots=True)
class StoredReport:
    """A report as stored: the verbatim signed bytes, how and when it came, and its fields.

    ``packets``, ``bytes``, ``first_ms``, ``last_ms`` and ``report_time_ms`` saturate at
    2**63-1; :meth:`signed_report` decodes the exact values from ``cose``.
    """

    report_id: str
    cose: bytes
    received_ms: int
    via: str
    observer_key: bytes
    kind: str
    src: Address
    dst: Address
    proto: int
    sport: int
    dport: int
    packets: int
    bytes: int
    first_ms: int
    last_ms: int
    tcp_flags: int
    tos: int
    src_as: int | None
    dst_as: int | None
    report_time_ms: int
    probability: float
    sampling_format: str
    sampling_interval: int
    sampling_provenance: str
    #: the observer's trust label when the report arrived; None for local and older reports
    trust: str | None = None
    #: this node's sequence number for the report (increasing in commit order, not contiguous)
    seq: int = 0
    #: the fewest peer-to-peer hops it made to reach us (0: not through a peer)
    hops: int = 0

    def signed_report(self) -> rpt.SignedReport:
        """The stored bytes decoded again, as the :class:`SignedReport` that was stored.

        The signature is not checked again: only verified reports are ever stored (the type of
        :meth:`Store.add_report` says so). Check it with
        :func:`overflowd.identity.verify_report` when the database itself is not trusted.
        """
        return stored_signed_report(self.report_id, self.cose)


@dataclass(frozen=True, slots=True)
class Arrival:
    """One way a report reached us (``report_arrivals``): channel, how often, first and last."""

    channel: str
    count: int
    first_ms: int
    last_ms: int


@dataclass(frozen=True, slots=True)
class ObserverRow:
    """An observer key we hold reports from; contacts and point are from its latest report."""

    key: bytes
    fingerprint: str
    contacts: tuple[str, ...]
    point: str
    first_seen_ms: int
    last_seen_ms: int
    reports: int
    #: since when these contacts are unchanged, as the daemon's trust book saw it; None if unknown
    contacts_since_ms: int | None = None


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Counters since this :class:`Store` was opened."""

    reports_new: int
    reports_duplicate: int
    errors: int


# ---------------------------------------------------------------------------------------------
# Errors: the one boundary


def _mask_url_text(url: str) -> str:
    # For URLs SQLAlchemy cannot even parse: hide anything between "user:" and "@".
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _why(exc: BaseException) -> str:
    """One line saying what went wrong, without SQLAlchemy's boilerplate around it."""
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    message = str(orig if orig is not None else exc)
    message = message.split("(Background on this error at:")[0]
    message = " ".join(message.split())
    if len(message) > 400:
        message = message[:397] + "..."
    return message or type(exc).__name__


#: What SQLAlchemy, Alembic and the drivers raise that is the world's fault, not ours.
_BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    SQLAlchemyError,
    OSError,
)


# ---------------------------------------------------------------------------------------------
# The store


def dialect_insert(
    sqlite: bool,
) -> Callable[[Table], sqlite_dialect.Insert | pg_dialect.Insert]:
    """The backend's own INSERT (for ON CONFLICT). Imported here: the PostgreSQL dialect pulls
    in asyncio and asyncpg's adapter (~35 ms), which a CLI on a SQLite store never needs."""
    if sqlite:
        from sqlalchemy.dialects import sqlite as sqlite_dialect

        return sqlite_dialect.insert
    from sqlalchemy.dialects import postgresql as pg_dialect

    return pg_dialect.insert


class Store:
    """Signed reports and their observers. Open with :meth:`Store.open`; close when done."""

    def __init__(self, engine: Engine, *, name: str) -> None:
        # Use Store.open(); this only wraps an engine that open() configured and migrated.
        self._engine = engine
        self._name = name
        self._sqlite = engine.dialect.name == "sqlite"
        self._insert_reports, self._upsert_observers = self._statements(self._sqlite)
        self._upsert_arrivals = self._arrivals_statement(self._sqlite)
        self._lock = threading.Lock()
        self._new = 0
        self._duplicate = 0
        self._errors = 0
        # Called (from the committing thread) after a write stored new reports: PeerPush's
        # wake-up, so a new report is forwarded at once rather than at the next poll.
        self._on_new: list[Callable[[], None]] = []

    def on_new_reports(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn()`` after each commit that stored new reports; returns the undo.

        ``fn`` runs in whatever thread committed, so it must be cheap and thread-safe (e.g.
        ``TrioToken.run_sync_soon``); an exception from it is not the write's failure.
        """
        self._on_new.append(fn)
        return lambda: self._on_new.remove(fn) if fn in self._on_new else None

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> Store:
        """Connect to the database at ``url`` and bring its schema to the latest migration.

        ``sqlite:///path`` (the parent directory is created) or
        ``postgresql+psycopg://user:pw@host/db``; a bare ``postgresql://`` means psycopg 3.
        Opening an up-to-date database again changes nothing. ``create=False`` is for readers
        (queries): a SQLite file must exist ("no store at PATH" otherwise, nothing created) and
        is opened read-only, so a read-only home or file can be queried.
        """
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise StoreError(f"database {_mask_url_text(url)}: not a database URL ({exc})") from exc
        name = parsed.render_as_string(hide_password=True)
        backend = parsed.get_backend_name()
        if backend not in _BACKENDS:
            raise StoreError(
                f"database {name}: backend {backend!r} is not supported (use sqlite or postgresql)"
            )
        if backend == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            engine = _create_engine(parsed, create=create)
        except ImportError as exc:
            raise StoreError(
                f"database {name}: driver not installed ({exc}); "
                "install overflowd[postgres] for PostgreSQL"
            ) from exc
        except _BACKEND_ERRORS as exc:
            raise StoreError(f"database {name}: {_why(exc)}") from exc
        store = cls(engine, name=name)
        try:
            store._migrate()
        except BaseException:
            engine.dispose()
            raise
        log.info("store.opened database=%s", name)
        return store

    def _migrate(self) -> None:
        if self._schema_revision() == SCHEMA_HEAD:
            return
        import alembic.command  # only when there is something to migrate: see SCHEMA_HEAD
        import alembic.config
        import alembic.util.exc

        config = alembic.config.Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.set_main_option("path_separator", "os")
        # Alembic keeps the running migration context in a module global: one at a time here.
        with (
            _MIGRATING,
            self._guard("opening"),
            self._transaction(write=True) as conn,
        ):
            if not self._sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            config.attributes["connection"] = conn
            try:
                alembic.command.upgrade(config, "head")
            except alembic.util.exc.CommandError as exc:
                with self._lock:
                    self._errors += 1
                raise StoreError(f"database {self._name}: opening: {_why(exc)}") from exc

    def _schema_revision(self) -> str | None:
        """The database's Alembic revision, or None when there is no version table yet."""
        with self._guard("opening"), self._transaction(write=False) as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        return str(rows[0]) if len(rows) == 1 else None

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The database URL with its password masked, for logs and messages."""
        return self._name

    @property
    def backend(self) -> str:
        """``'sqlite'`` or ``'postgresql'``."""
        return str(self._engine.dialect.name)

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except _BACKEND_ERRORS as exc:
            with self._lock:
                self._errors += 1
            raise StoreError(f"database {self._name}: {doing}: {_why(exc)}") from exc

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            if write and self._sqlite:
                # Take SQLite's write lock at BEGIN, where busy_timeout waits for it, rather than
                # at the first write, where a deferred reader upgrading may get SQLITE_BUSY at once.
                conn.execution_options(overflowd_sqlite_begin="BEGIN IMMEDIATE")
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def transaction(self, doing: str, *, write: bool) -> Iterator[Connection]:
        """One transaction for sibling repositories (the webhook outbox), errors mapped here.

        ``doing`` names the operation in a :class:`StoreError`; ``write`` takes SQLite's write
        lock at BEGIN, so a read-then-update inside is atomic on both backends.
        """
        with self._guard(doing), self._transaction(write=write) as conn:
            yield conn

    def close(self) -> None:
        """Release every pooled connection. The store cannot be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._name!r})"

    def statistics(self) -> StoreStatistics:
        with self._lock:
            return StoreStatistics(
                reports_new=self._new, reports_duplicate=self._duplicate, errors=self._errors
            )

    # -- writing ------------------------------------------------------------------------------

    def add_report(self, report: rpt.SignedReport, *, received_ms: int, via: str) -> bool:
        """Store a verified report; True if it is new, False if this id was already stored."""
        return self.add_reports([(report, received_ms, via)]) == 1

    def add_reports(
        self,
        reports: Sequence[tuple[rpt.SignedReport, int, str]],
        *,
        trust: Mapping[str, str] | None = None,
        alongside: Callable[[Connection], object] | None = None,
        senders: Mapping[str, str] | None = None,
        channels: Mapping[str, str] | None = None,
        hops: Mapping[str, int] | None = None,
    ) -> int:
        """Store ``(report, received_ms, via)`` in one transaction; return how many were new.

        :meth:`add_new_reports` is the same and says which ids were new.
        """
        return len(
            self.add_new_reports(
                reports,
                trust=trust,
                alongside=alongside,
                senders=senders,
                channels=channels,
                hops=hops,
            )
        )

    def add_new_reports(
        self,
        reports: Sequence[tuple[rpt.SignedReport, int, str]],
        *,
        trust: Mapping[str, str] | None = None,
        alongside: Callable[[Connection], object] | None = None,
        senders: Mapping[str, str] | None = None,
        channels: Mapping[str, str] | None = None,
        hops: Mapping[str, int] | None = None,
    ) -> set[str]:
        """Store ``(report, received_ms, via)`` in one transaction; return the ids that were new.

        A report already stored, or repeated within ``reports``, is counted once (the first
        entry wins). Each observer's row is updated once for its new reports. ``trust`` maps
        report ids to the observer's trust label when they arrived (stored with new reports
        only: a report stored before keeps the label it came with). ``senders`` maps report ids
        to the /24 or /48 they came from, for the storage budgets per sender network.
        ``alongside`` runs in the same transaction after the inserts (the daemon's outbox
        rows): both commit or neither.

        Every entry, new or duplicate, is counted as an arrival in ``report_arrivals`` (one
        upsert per transaction): its channel is ``channels[id]`` when given (a peer's
        ``peer:<fingerprint>``), else its ``via``'s. ``hops`` maps ids to the peer-to-peer hop
        count they came with (0 when absent); a report's stored ``hops`` is the fewest seen.
        """
        rows: dict[str, dict[str, Any]] = {}
        observed: dict[str, tuple[rpt.Observer, int]] = {}
        arrivals: dict[tuple[str, str], dict[str, Any]] = {}
        for report, received_ms, via in reports:
            if via not in VIAS:
                raise ValueError(f"via must be one of {sorted(VIAS)}, not {via!r}")
            if received_ms < 0:
                raise ValueError("received_ms must not be negative")
            rid = report.report_id
            channel = (channels.get(rid) if channels else None) or _VIA_CHANNEL[via]
            if len(channel) > MAX_CHANNEL_CHARS:
                raise ValueError(f"a channel is at most {MAX_CHANNEL_CHARS} characters")
            at = _saturate(received_ms)
            arrival = arrivals.get((rid, channel))
            if arrival is None:
                arrivals[(rid, channel)] = {
                    "report_id": rid,
                    "channel": channel,
                    "count": 1,
                    "first_ms": at,
                    "last_ms": at,
                }
            else:
                arrival["count"] += 1
                arrival["first_ms"] = min(arrival["first_ms"], at)
                arrival["last_ms"] = max(arrival["last_ms"], at)
            h = hops.get(rid, 0) if hops else 0
            if h < 0:
                raise ValueError("hops must not be negative")
            if rid in rows:
                rows[rid]["hops"] = min(rows[rid]["hops"], h)
            if report.report_id not in rows:
                label = trust.get(report.report_id) if trust else None
                label = None if label is None else label[:16]  # the column holds 16
                rows[report.report_id] = _report_row(report, received_ms, via, label)
                net = senders.get(report.report_id) if senders else None
                rows[report.report_id]["sender_net"] = net[:43] if net else None
                rows[report.report_id]["hops"] = h
                observed[report.report_id] = (report.payload.observer, received_ms)
        if not rows:
            return set()
        with self._guard("storing reports"), self._transaction(write=True) as conn:
            # Numbers first: the counter's lock is held to the commit, so writers number (and
            # become visible) one after the other. A duplicate leaves its number unused.
            last = conn.execute(
                _SEQUENCE.update()
                .where(_SEQUENCE.c.name == _REPORTS_SEQUENCE)
                .values(last=_SEQUENCE.c.last + len(rows))
                .returning(_SEQUENCE.c.last)
            ).scalar_one()
            for seq, row in enumerate(rows.values(), start=int(last) - len(rows) + 1):
                row["seq"] = seq
            new_ids: set[str] = set(
                conn.execute(self._insert_reports, list(rows.values())).scalars()
            )
            new = ((rows[i]["observer_key"], *observed[i], rows[i]) for i in new_ids)
            observer_rows = _observer_rows(new)
            if observer_rows:
                conn.execute(self._upsert_observers, observer_rows)
            # A report stored before that now came by a shorter path keeps the fewer hops: one
            # UPDATE per hop count among the duplicates (a batch mostly has one), by id list.
            by_hops: dict[int, list[str]] = {}
            for rid, row in rows.items():
                if rid not in new_ids:
                    by_hops.setdefault(row["hops"], []).append(rid)
            for h, ids in sorted(by_hops.items()):
                for start in range(0, len(ids), _UPDATE_CHUNK):
                    conn.execute(
                        _REPORTS.update()
                        .where(
                            _REPORTS.c.id.in_(ids[start : start + _UPDATE_CHUNK]),
                            _REPORTS.c.hops > h,
                        )
                        .values(hops=h)
                    )
            # Sorted, like the observer rows: concurrent PostgreSQL batches lock in one order.
            conn.execute(self._upsert_arrivals, [arrivals[k] for k in sorted(arrivals)])
            if alongside is not None:
                alongside(conn)
        with self._lock:
            self._new += len(new_ids)
            self._duplicate += len(reports) - len(new_ids)
        if new_ids:
            for fn in tuple(self._on_new):
                try:
                    fn()
                except Exception:  # a listener's bug never undoes a committed write
                    log.exception("store.listener_failed")
        return new_ids

    @staticmethod
    def _statements(sqlite: bool) -> tuple[ReturningInsert[Any], Insert]:
        """The two writes, in the dialect's own INSERT (for ON CONFLICT)."""
        insert = dialect_insert(sqlite)
        # RETURNING lists only the rows actually inserted; a conflicting id returns nothing.
        reports = (
            insert(_REPORTS)
            .on_conflict_do_nothing(index_elements=[_REPORTS.c.id])
            .returning(_REPORTS.c.id)
        )
        t = _OBSERVERS
        stmt = insert(t)
        new = stmt.excluded
        # "Latest" is by received time: contacts and point follow the most recently received
        # report, so an old import cannot overwrite what a fresh report said. Written as CASE,
        # not min()/max() vs LEAST()/GREATEST(), so it is the same SQL on both backends.
        newer = new.last_seen_ms >= t.c.last_seen_ms
        observers = stmt.on_conflict_do_update(
            index_elements=[t.c.key],
            set_={
                "first_seen_ms": case(
                    (new.first_seen_ms < t.c.first_seen_ms, new.first_seen_ms),
                    else_=t.c.first_seen_ms,
                ),
                "last_seen_ms": case((newer, new.last_seen_ms), else_=t.c.last_seen_ms),
                "contacts": case((newer, new.contacts), else_=t.c.contacts),
                "point": case((newer, new.point), else_=t.c.point),
                "reports": t.c.reports + new.reports,
                "packets_unit": _larger(new.packets_unit, t.c.packets_unit),
                "bytes_unit": _larger(new.bytes_unit, t.c.bytes_unit),
                # Other contacts in a newer report: the trust book's date no longer applies
                # (the daemon writes the right one with its next continuity batch).
                "contacts_since_ms": case(
                    (and_(newer, new.contacts != t.c.contacts), None),
                    else_=t.c.contacts_since_ms,
                ),
            },
        )
        return reports, observers

    @staticmethod
    def _arrivals_statement(sqlite: bool) -> Insert:
        """Count one more arrival per (report, channel); first and last times widen."""
        insert = dialect_insert(sqlite)
        t = _ARRIVALS
        stmt = insert(t)
        new = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[t.c.report_id, t.c.channel],
            set_={
                "count": t.c.count + new.count,
                "first_ms": case((new.first_ms < t.c.first_ms, new.first_ms), else_=t.c.first_ms),
                "last_ms": case((new.last_ms > t.c.last_ms, new.last_ms), else_=t.c.last_ms),
            },
        )

    def arrivals(self, report_ids: Sequence[str]) -> dict[str, list[Arrival]]:
        """Every way each of ``report_ids`` arrived, by channel name (unknown ids: absent)."""
        out: dict[str, list[Arrival]] = {}
        ids = sorted(set(report_ids))
        if not ids:
            return out
        t = _ARRIVALS
        with self._guard("reading arrivals"), self._transaction(write=False) as conn:
            for start in range(0, len(ids), _UPDATE_CHUNK):
                stmt = (
                    select(t)
                    .where(t.c.report_id.in_(ids[start : start + _UPDATE_CHUNK]))
                    .order_by(t.c.report_id, t.c.channel)
                )
                for row in conn.execute(stmt):
                    m = row._mapping
                    out.setdefault(str(m["report_id"]), []).append(
                        Arrival(
                            channel=str(m["channel"]),
                            count=int(m["count"]),
                            first_ms=int(m["first_ms"]),
                            last_ms=int(m["last_ms"]),
                        )
                    )
        return out

    # -- reading ------------------------------------------------------------------------------

    def query_reports(
        self,
        *,
        src: Network | None = None,
        dst: Network | None = None,
        since_ms: int | None = None,
        limit: int | None = None,
    ) -> list[StoredReport]:
        """Reports whose source is in ``src`` and destination in ``dst``, newest received first.

        ``since_ms`` keeps reports received at or after that time. A prefix matches only
        reports of its own address family.
        """
        t = _REPORTS
        stmt = select(t)
        for column, net in ((t.c.src, src), (t.c.dst, dst)):
            if net is not None:
                lo, hi = network_range(net)
                stmt = stmt.where(column >= lo, column <= hi, t.c.ip_version == net.version)
        if since_ms is not None:
            stmt = stmt.where(t.c.received_ms >= since_ms)
        stmt = stmt.order_by(t.c.received_ms.desc(), t.c.report_time_ms.desc(), t.c.id)
        if limit is not None:
            if limit < 0:
                raise ValueError("limit must not be negative")
            stmt = stmt.limit(limit)
        with self._guard("querying reports"), self._transaction(write=False) as conn:
            return [_stored_report(row._mapping) for row in conn.execute(stmt)]

    def reports_after(
        self,
        after: int,
        limit: int,
        *,
        src: Network | None = None,
        dst: Network | None = None,
        either: Network | None = None,
        where: ColumnElement[bool] | None = None,
    ) -> tuple[list[StoredReport], int]:
        """Up to ``limit`` reports numbered above ``after``, in number order, and the next cursor.

        Paging from 0 sees every report once, including those stored while it pages: numbers
        are given in commit order, so none can appear below a cursor already passed. A full
        page's cursor is its last report's number. A short page has returned everything up to
        the highest number committed, so its cursor is that number (read first, in the same
        transaction): filtered-out reports are not looked at again. ``either`` keeps reports
        whose source or destination is in it (a network's own view); ``src``/``dst`` filter
        one end; ``where`` is any further condition on the reports table
        (:mod:`overflowd.store.query` filters). A cursor above the highest number given raises
        :class:`CursorAhead`.
        """
        if not 0 <= after <= MAX_SEQ:
            raise ValueError(f"after must be 0 to {MAX_SEQ}")
        if not 1 <= limit <= MAX_PAGE_REPORTS:
            raise ValueError(f"limit must be 1 to {MAX_PAGE_REPORTS}")
        t = _REPORTS
        stmt = select(t).where(t.c.seq > after)
        for column, net in ((t.c.src, src), (t.c.dst, dst)):
            if net is not None:
                lo, hi = network_range(net)
                stmt = stmt.where(column >= lo, column <= hi, t.c.ip_version == net.version)
        if either is not None:
            lo, hi = network_range(either)
            stmt = stmt.where(
                t.c.ip_version == either.version,
                ((t.c.src >= lo) & (t.c.src <= hi)) | ((t.c.dst >= lo) & (t.c.dst <= hi)),
            )
        if where is not None:
            stmt = stmt.where(where)
        stmt = stmt.order_by(t.c.seq).limit(limit)
        committed = select(_SEQUENCE.c.last).where(_SEQUENCE.c.name == _REPORTS_SEQUENCE)
        with self._guard("paging reports"), self._transaction(write=False) as conn:
            # The counter before the rows: every number up to it belongs to a committed
            # transaction, so the rows read next hold all of them that match (and maybe more).
            last_committed = int(conn.execute(committed).scalar_one())
            if after > last_committed:
                # Every cursor this store hands out is a committed number (below): this one
                # is not its own. An empty page would hide all reports numbered below it.
                raise CursorAhead(after, last_committed)
            page = [_stored_report(row._mapping) for row in conn.execute(stmt)]
        if len(page) == limit:
            return page, page[-1].seq
        return page, max(after, last_committed, page[-1].seq if page else 0)

    def last_seq(self) -> int:
        """The highest number given out so far (0 for a new store)."""
        stmt = select(_SEQUENCE.c.last).where(_SEQUENCE.c.name == _REPORTS_SEQUENCE)
        with self._guard("reading the report sequence"), self._transaction(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def get_report(self, report_id: str) -> StoredReport | None:
        """The report with this id (lowercase hex SHA-256 of its bytes), if stored."""
        stmt = select(_REPORTS).where(_REPORTS.c.id == report_id.lower())
        with self._guard("reading a report"), self._transaction(write=False) as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _stored_report(row._mapping)

    def count_reports(self) -> int:
        stmt = select(func.count()).select_from(_REPORTS)
        with self._guard("counting reports"), self._transaction(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def observers(self) -> list[ObserverRow]:
        """Every observer we hold reports from, most recently seen first."""
        t = _OBSERVERS
        stmt = select(t).order_by(t.c.last_seen_ms.desc(), t.c.key)
        with self._guard("reading observers"), self._transaction(write=False) as conn:
            return [_observer(row._mapping) for row in conn.execute(stmt)]

    # -- relabelling --------------------------------------------------------------------------

    def update_trust(self, changes: Mapping[str, tuple[str | None, str]]) -> int:
        """Relabel stored reports: ``{report_id: (label expected now, new label)}``, in one
        transaction; return how many rows changed.

        A row changes only while it still holds the expected label, so a report that reached
        the store first by another path (and kept that path's label) is left alone. Unknown
        ids are ignored: the in-band listener relabels after storing, once DNS has answered.
        """
        by_change: dict[tuple[str | None, str], list[str]] = {}
        for report_id, (old, new) in changes.items():
            # the column holds 16, as add_reports stores it
            expected = None if old is None else old[:16]
            by_change.setdefault((expected, new[:16]), []).append(report_id.lower())
        t = _REPORTS
        changed = 0
        with self._guard("relabelling reports"), self._transaction(write=True) as conn:
            for (old, new), ids in sorted(
                by_change.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])
            ):
                ids.sort()  # the same lock order on PostgreSQL for concurrent relabels
                for i in range(0, len(ids), _UPDATE_CHUNK):
                    still = t.c.trust.is_(None) if old is None else t.c.trust == old
                    stmt = (
                        t.update()
                        .where(t.c.id.in_(ids[i : i + _UPDATE_CHUNK]), still)
                        .values(trust=new)
                    )
                    changed += conn.execute(stmt).rowcount
        return changed


# ---------------------------------------------------------------------------------------------
# Engine setup


def _create_engine(url: URL, *, create: bool = True) -> Engine:
    if url.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        # pre_ping: a pooled connection outlives a server restart; test it before use.
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    database = url.database or ""
    in_memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
    if in_memory:
        # One shared connection, or each pooled connection would see its own empty database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif not create and not database.startswith("file:"):
        path = Path(database).expanduser()
        if not path.is_file():
            raise StoreError(f"no store at {path}")
        # mode=ro writes nothing, but a WAL database's reader still creates -shm (and -wal)
        # next to it when no writer has. Where it cannot (a read-only directory) and there is
        # no -wal, no writer is running and nothing is left to checkpoint: read the file as
        # immutable (no locks, no shared memory), as SQLite documents for read-only media.
        query = {"mode": "ro", "uri": "true"}
        wal = path.with_name(path.name + "-wal")
        if not wal.exists() and not os.access(path.parent, os.W_OK):
            query["immutable"] = "1"
        engine = create_engine(url.set(database=f"file:{quote(str(path.resolve()))}", query=query))
    else:
        if not database.startswith("file:"):
            # the same file the read-only path (and fastread) opens for "~/x": sqlite3 itself
            # would open a directory named "~" below the working directory
            path = Path(database).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            url = url.set(database=str(path))
        engine = create_engine(url)
    _configure_sqlite(engine, read_only=not create)
    return engine


def _configure_sqlite(engine: Engine, *, read_only: bool = False) -> None:
    """WAL, foreign keys, a busy timeout, and SQLAlchemy (not pysqlite) in charge of BEGIN.

    pysqlite's legacy transaction control skips BEGIN before DDL and SELECT, which would let the
    migration autocommit statement by statement; SQLAlchemy's documented recipe is to switch it
    off and emit BEGIN ourselves.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if read_only:  # the writer chose the journal mode; setting it would write
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            # WAL with synchronous=NORMAL is durable across crashes of the process, and loses at
            # most the last transactions on power loss; what SQLite recommends for WAL.
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("overflowd_sqlite_begin", "BEGIN"))


# ---------------------------------------------------------------------------------------------
# Rows


def _report_row(
    report: rpt.SignedReport, received_ms: int, via: str, trust: str | None = None
) -> dict[str, Any]:
    p = report.payload
    fl = p.flow
    row = {
        "id": report.report_id,
        "cose": report.cose,
        "observer_key": report.observer_key,
        "kind": p.kind,
        "ip_version": fl.src.version,
        "src": address_to_key(fl.src),
        "dst": address_to_key(fl.dst),
        "proto": fl.proto,
        "sport": fl.sport,
        "dport": fl.dport,
        "packets": _saturate(fl.packets),
        "bytes": _saturate(fl.bytes),
        "first_ms": _saturate(fl.first),
        "last_ms": _saturate(fl.last),
        "tcp_flags": fl.tcp_flags,
        "tos": fl.tos,
        "src_as": fl.src_as,
        "dst_as": fl.dst_as,
        "report_time_ms": _saturate(p.time),
        "probability": p.sampling.probability,
        "sampling_format": p.sampling.format,
        "sampling_interval": p.sampling.interval,
        "sampling_provenance": p.sampling.provenance,
        "received_ms": _saturate(received_ms),
        "via": via,
        "trust": trust,
    }
    return derived_columns(row)


def _larger(new: Any, old: Any) -> Any:
    """The larger of two nullable columns, NULL counting as smaller than anything (CASE, not
    max()/GREATEST(), so it is the same SQL on both backends)."""
    return case((new.is_(None), old), (old.is_(None), new), (new > old, new), else_=old)


def _observer_rows(
    new: Iterable[tuple[bytes, rpt.Observer, int, Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """One upsert row per observer key from ``(key, observer, received_ms, report row)`` of new
    reports.

    Sorted by key, so that concurrent batches on PostgreSQL lock observer rows in the same order
    and cannot deadlock. ``packets_unit``/``bytes_unit`` are the largest weights n·k/p and b·k/p
    among the p < 1 reports (the observer's estimate unit, :mod:`overflowd.store.query`).
    """
    by_key: dict[bytes, dict[str, Any]] = {}
    for key, observer, received_ms, row in new:
        received = _saturate(received_ms)
        current = by_key.get(key)
        if current is None:
            current = by_key[key] = {
                "key": key,
                "fingerprint": rpt.key_fingerprint(key),
                "first_seen_ms": received,
                "last_seen_ms": received,
                "reports": 0,
                "packets_unit": None,
                "bytes_unit": None,
            }
        current["reports"] += 1
        p = row["probability"]
        if p < 1.0:
            k = row["sampling_interval"]
            for field, amount in (("packets_unit", row["packets"]), ("bytes_unit", row["bytes"])):
                w = amount * k / p  # inf for a p near 5e-324, as Tally.add
                if current[field] is None or w > current[field]:
                    current[field] = w
        current["first_seen_ms"] = min(current["first_seen_ms"], received)
        if received >= current["last_seen_ms"] or "contacts" not in current:
            current["last_seen_ms"] = received
            current["contacts"] = json.dumps(list(observer.contacts))
            current["point"] = observer.point
    return [by_key[k] for k in sorted(by_key)]


def _address(key: bytes, version: int) -> Address:
    # A report signed with an IPv6 address inside ::ffff:0:0/96 stays IPv6.
    return key_to_address(key) if version == 4 else ipaddress.IPv6Address(key)


def _stored_report(m: RowMapping) -> StoredReport:
    version = int(m["ip_version"])
    return StoredReport(
        report_id=str(m["id"]),
        cose=bytes(m["cose"]),
        received_ms=int(m["received_ms"]),
        via=str(m["via"]),
        observer_key=bytes(m["observer_key"]),
        kind=str(m["kind"]),
        src=_address(bytes(m["src"]), version),
        dst=_address(bytes(m["dst"]), version),
        proto=int(m["proto"]),
        sport=int(m["sport"]),
        dport=int(m["dport"]),
        packets=int(m["packets"]),
        bytes=int(m["bytes"]),
        first_ms=int(m["first_ms"]),
        last_ms=int(m["last_ms"]),
        tcp_flags=int(m["tcp_flags"]),
        tos=int(m["tos"]),
        src_as=None if m["src_as"] is None else int(m["src_as"]),
        dst_as=None if m["dst_as"] is None else int(m["dst_as"]),
        report_time_ms=int(m["report_time_ms"]),
        probability=float(m["probability"]),
        sampling_format=str(m["sampling_format"]),
        sampling_interval=int(m["sampling_interval"]),
        sampling_provenance=str(m["sampling_provenance"]),
        trust=None if m["trust"] is None else str(m["trust"]),
        seq=int(m["seq"]),
        hops=int(m["hops"]),
    )


def _observer(m: RowMapping) -> ObserverRow:
    return ObserverRow(
        key=bytes(m["key"]),
        fingerprint=str(m["fingerprint"]),
        contacts=tuple(json.loads(m["contacts"])),
        point=str(m["point"]),
        first_seen_ms=int(m["first_seen_ms"]),
        last_seen_ms=int(m["last_seen_ms"]),
        reports=int(m["reports"]),
        contacts_since_ms=None if m["contacts_since_ms"] is None else int(m["contacts_since_ms"]),
    )
