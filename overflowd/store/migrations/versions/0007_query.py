"""Indexes for the query filters (issue #11): every filter of ``overflowd-query`` is indexed.

Flow time gets its own indexes (``last_ms`` for --since, covering what who/top read;
``first_ms`` for --until); the
equality filters get ``(column, last_ms)``, so one index both selects and yields the newest
flows first; ``src``/``dst`` become ``(address, last_ms)`` (a prefix is still a range on the
leading column); ``observer_key`` becomes ``(observer_key, received_ms)``, which also finds an
observer's latest report at once (its current trust label). docs/storage.md "Queries" has the
table.

``observers.packets_unit``/``bytes_unit``: each observer's largest weight n·k/p and b·k/p over
its p < 1 reports, kept up to date by every insert, so that the unit of an estimate's interval
(docs/estimates.md) is one row away instead of a scan of the observer's reports. Filled here
from the reports already stored (a weight above 1e300 is stored as infinity).

Revision ID: 0007_query
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_query"
down_revision: str | Sequence[str] | None = "0007_subscriptions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: what who/top read of a report: flow time first, then the grouping keys and the sums
COVERING = (
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
)
#: (name, columns) created by this revision
NEW = (
    # covering: the aggregations of a time window (who/top --since) read only this index, not
    # the rows (a report's row is ~1 kB, most of it the signed bytes)
    ("ix_reports_last_ms_covering", list(COVERING)),
    ("ix_reports_first_ms", ["first_ms"]),
    ("ix_reports_src_last_ms", ["src", "last_ms"]),
    ("ix_reports_dst_last_ms", ["dst", "last_ms"]),
    ("ix_reports_observer_key_received_ms", ["observer_key", "received_ms"]),
    ("ix_reports_proto_last_ms", ["proto", "last_ms"]),
    ("ix_reports_sport_last_ms", ["sport", "last_ms"]),
    ("ix_reports_dport_last_ms", ["dport", "last_ms"]),
    ("ix_reports_kind_last_ms", ["kind", "last_ms"]),
    ("ix_reports_trust", ["trust"]),
)
#: (name, columns) of 0001 that the new ones cover (same leading column)
REPLACED = (
    ("ix_reports_src", ["src"]),
    ("ix_reports_dst", ["dst"]),
    ("ix_reports_observer_key", ["observer_key"]),
)


def upgrade() -> None:
    for name, columns in NEW:
        op.create_index(name, "reports", columns)
    for name, _ in REPLACED:
        op.drop_index(name, table_name="reports")
    with op.batch_alter_table("observers") as batch:
        batch.add_column(sa.Column("packets_unit", sa.Double(), nullable=True))
        batch.add_column(sa.Column("bytes_unit", sa.Double(), nullable=True))
    # Without dividing into an overflow: PostgreSQL raises on a float8 overflow.
    inf = "9e999" if op.get_bind().dialect.name == "sqlite" else "'Infinity'::float8"
    for column, amount in (("packets_unit", "packets"), ("bytes_unit", "bytes")):
        scaled = f"CAST(r.{amount} AS DOUBLE PRECISION) * r.sampling_interval"
        op.execute(
            f"UPDATE observers SET {column} = (SELECT MAX(CASE WHEN {scaled} > "
            f"r.probability * 1e300 THEN {inf} ELSE {scaled} / r.probability END) "
            "FROM reports r WHERE r.observer_key = observers.key AND r.probability < 1)"
        )


def downgrade() -> None:
    with op.batch_alter_table("observers") as batch:
        batch.drop_column("bytes_unit")
        batch.drop_column("packets_unit")
    for name, columns in REPLACED:
        op.create_index(name, "reports", columns)
    for name, _ in reversed(NEW):
        op.drop_index(name, table_name="reports")
