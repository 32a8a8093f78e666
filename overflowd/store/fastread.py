"""A read-only SQLite reader on stdlib ``sqlite3``: ``overflowd-query reports`` without SQLAlchemy.

SQLAlchemy's import is a quarter second of every ``overflowd-query`` process, ten times the
question itself on a store of a million reports (issue #16). On a SQLite store at the schema
this module was written for (:data:`SCHEMA`), the query CLI asks here instead: the very
statements :mod:`overflowd.store.query` sends, byte for byte and with the same parameters (a
test compiles SQLAlchemy's for every filter and compares), and the same answer objects
(:func:`overflowd.answers.report_object`; a test runs both paths on one store).

Anything else returns None from :meth:`Reader.open` and the caller takes the :class:`Store`
path, which stays the reference: PostgreSQL, a URL with options, a store at another schema
revision, a missing file (the Store says "no store at PATH"). A database error is raised as
:class:`sqlite3.Error`, before anything is printed, so the caller can ask the Store again and
have the error said its way.

It must never write (the file is opened ``mode=ro``) and never import SQLAlchemy.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from overflowd.answers import report_object
from overflowd.store.base import (
    BIGINT_MAX,
    TRUST_ORDER,
    ReportFilter,
    resolve_observer_with,
    stored_signed_report,
)

#: The schema revision these statements are written for (repository.SCHEMA_HEAD, which a test
#: compares): at any other the Store answers.
SCHEMA = "0011_q10_visibility"
#: PRAGMA busy_timeout, as the Store sets it (repository.SQLITE_BUSY_TIMEOUT_MS; a test checks)
BUSY_TIMEOUT_MS = 10 * 1000

#: The reports table's columns in the models' order (``SELECT reports.*`` as SQLAlchemy writes
#: it): a test compares with the table.
COLUMNS = (
    "id", "cose", "observer_key", "kind", "ip_version", "src", "dst", "proto", "sport", "dport",
    "packets", "bytes", "first_ms", "last_ms", "tcp_flags", "tos", "src_as", "dst_as",
    "report_time_ms", "probability", "sampling_format", "sampling_interval",
    "sampling_provenance", "received_ms", "via", "trust", "sender_net", "seq", "hops",
    "src_key", "dst_key", "packets_weight", "bytes_weight",
)  # fmt: skip
_AT = {name: i for i, name in enumerate(COLUMNS)}
_SELECT = "SELECT " + ", ".join("reports." + c for c in COLUMNS) + " \nFROM reports"
_COUNT = "SELECT count(*) AS count_1 \nFROM reports"
_ORDER = " ORDER BY reports.last_ms DESC, reports.seq DESC"
LAST_SEQ_SQL = "SELECT report_sequence.last \nFROM report_sequence \nWHERE report_sequence.name = ?"
OBSERVERS_LIKE_SQL = (
    'SELECT observers."key", observers.fingerprint \nFROM observers \n'
    'WHERE observers.fingerprint LIKE ? ORDER BY observers.fingerprint, observers."key"\n'
    " LIMIT ? OFFSET ?"
)
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _key(packed: bytes) -> bytes:
    # repository.address_to_key: IPv4 as ::ffff:a.b.c.d
    return _V4_MAPPED + packed if len(packed) == 4 else packed


def _in(column: str, net: Any) -> tuple[str, list[Any]]:
    lo, hi = _key(net.network_address.packed), _key(net.broadcast_address.packed)
    return (
        f"reports.{column} >= ? AND reports.{column} <= ? AND reports.ip_version = ?",
        [lo, hi, net.version],
    )


def where(flt: ReportFilter) -> tuple[str, list[Any]]:
    """``query.conditions(flt)`` as SQLAlchemy compiles it for SQLite: the WHERE clause (empty
    for no condition) and its positional parameters."""
    conds: list[tuple[str, list[Any], bool]] = []  # (sql, params, is an OR needing brackets)

    def add(sql: str, params: list[Any], ored: bool = False) -> None:
        conds.append((sql, params, ored))

    if flt.since_ms is not None:
        add("reports.last_ms BETWEEN ? AND ?", [flt.since_ms, BIGINT_MAX])
    if flt.until_ms is not None:
        add("reports.first_ms BETWEEN ? AND ?", [0, flt.until_ms])
    if flt.received_since_ms is not None or flt.received_until_ms is not None:
        first = 0 if flt.received_since_ms is None else flt.received_since_ms
        last = BIGINT_MAX if flt.received_until_ms is None else flt.received_until_ms
        add("reports.received_ms BETWEEN ? AND ?", [first, last])
    if flt.src is not None:
        add(*_in("src", flt.src))
    if flt.dst is not None:
        add(*_in("dst", flt.dst))
    if flt.either is not None:
        net = flt.either
        lo, hi = _key(net.network_address.packed), _key(net.broadcast_address.packed)
        add(
            "reports.ip_version = ? AND (reports.src >= ? AND reports.src <= ? OR "
            "reports.dst >= ? AND reports.dst <= ?)",
            [net.version, lo, hi, lo, hi],
        )
    if flt.proto is not None:
        add("reports.proto = ?", [flt.proto])
    if flt.port is not None:
        add("reports.sport = ? OR reports.dport = ?", [flt.port, flt.port], ored=True)
    if flt.sport is not None:
        add("reports.sport = ?", [flt.sport])
    if flt.dport is not None:
        add("reports.dport = ?", [flt.dport])
    if flt.kind is not None:
        add("reports.kind = ?", [flt.kind])
    if flt.observers:
        keys = sorted(set(flt.observers))
        add(f"reports.observer_key IN ({', '.join('?' * len(keys))})", list(keys))
    if flt.min_trust is not None:
        level = TRUST_ORDER.index(flt.min_trust)
        if level > 0:
            levels = list(TRUST_ORDER[level:])
            add(
                f"reports.trust IN ({', '.join('?' * len(levels))}) OR reports.via = ?",
                [*levels, "local"],
                ored=True,
            )
    if not conds:
        return "", []
    # AND of several: each OR in brackets (SQLAlchemy's self_group); a lone OR stands bare
    sql = " AND ".join(f"({s})" if ored and len(conds) > 1 else s for s, _, ored in conds)
    return " \nWHERE " + sql, [p for _, params, _ in conds for p in params]


def find_statement(flt: ReportFilter, limit: int | None) -> tuple[str, list[Any]]:
    """``query.find_reports``' statement: every column, newest flow first."""
    sql, params = where(flt)
    sql = _SELECT + sql + _ORDER
    if limit is not None:
        sql += "\n LIMIT ? OFFSET ?"
        params = [*params, limit, 0]
    return sql, params


def count_statement(flt: ReportFilter) -> tuple[str, list[Any]]:
    """``query.count_reports``' statement."""
    sql, params = where(flt)
    return _COUNT + sql, params


def sqlite_path(url: str) -> Path | None:
    """The file of a plain ``sqlite:///PATH`` URL; None for anything the Store should parse
    (options, URI filenames, percent-escapes, memory, another driver)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    database = url[len(prefix) :]
    if not database or any(c in database for c in "?%#") or database.startswith("file:"):
        return None
    if database == ":memory:":
        return None
    return Path(database).expanduser()


class Reader:
    """One read-only connection; every question in one transaction. Close when done."""

    def __init__(self, conn: sqlite3.Connection, name: str) -> None:
        self._conn = conn
        self.name = name

    @classmethod
    def open(cls, url: str) -> Reader | None:
        """The reader of the SQLite file at ``url``, or None where the Store must answer."""
        path = sqlite_path(url)
        if path is None or not path.is_file():
            return None
        # as repository._create_engine(create=False): read-only, and immutable where nothing
        # can be left to checkpoint and no -shm can be made (a read-only directory, no -wal)
        query = "mode=ro"
        wal = path.with_name(path.name + "-wal")
        if not wal.exists() and not os.access(path.parent, os.W_OK):
            query += "&immutable=1"
        conn = sqlite3.connect(
            f"file:{quote(str(path.resolve()))}?{query}",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("BEGIN")
            try:
                revision = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            except sqlite3.OperationalError:  # no version table: not a store (yet)
                revision = []
            if revision != [(SCHEMA,)]:
                conn.close()
                return None
        except BaseException:
            conn.close()
            raise
        return cls(conn, url)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def last_seq(self) -> int:
        (value,) = self._conn.execute(LAST_SEQ_SQL, ["reports"]).fetchone()
        return int(value)

    def resolve_observer(self, text: str) -> tuple[bytes, ...]:
        """:func:`overflowd.store.query.resolve_observer`, asked here."""

        def lookup(prefix: str, limit: int) -> Sequence[tuple[bytes, str]]:
            rows = self._conn.execute(OBSERVERS_LIKE_SQL, [prefix + "%", limit, 0])
            return [(bytes(k), str(fp)) for k, fp in rows]

        return resolve_observer_with(text, lookup, self.name)

    def count_reports(self, flt: ReportFilter) -> int:
        (value,) = self._conn.execute(*count_statement(flt)).fetchone()
        return int(value)

    def find_reports(self, flt: ReportFilter, *, limit: int | None = None) -> list[dict[str, Any]]:
        """``[report_json(r) for r in query.find_reports(store, flt, limit=limit)]``."""
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        rid, cose, received, via, trust, seq, hops = (
            _AT[c] for c in ("id", "cose", "received_ms", "via", "trust", "seq", "hops")
        )
        return [
            report_object(
                int(r[seq]),
                int(r[received]),
                str(r[via]),
                None if r[trust] is None else str(r[trust]),
                int(r[hops]),
                stored_signed_report(str(r[rid]), bytes(r[cose])),
            )
            for r in self._conn.execute(*find_statement(flt, limit))
        ]
