"""top's grouping keys and weights, stored (issue #11: `top --by src` of an hour under 100 ms).

``src_key``/``dst_key``: the address's /24 (IPv4) or /48 (IPv6) as one integer (IPv4: its
first 24 bits; IPv6: 2**48 plus its first 48 bits), so that ``top --by src|dst`` groups by an
integer column rather than a per-report ``substr`` of a blob. ``packets_weight``/
``bytes_weight``: each p < 1 report's Horvitz-Thompson weight n·k/p (+inf over the cap, 1e140),
NULL for p = 1, so the sums add stored numbers instead of evaluating the weight per report.
Every insert computes them (overflowd.store.models.derived_columns); this revision fills the
rows already stored, and adds them to the covering index of the time window (same name), so
that top still reads the index only.

Revision ID: 0009_top_keys
Revises: 0008_peer_records
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_top_keys"
down_revision: str | Sequence[str] | None = "0009_dash_dst_covering"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the covering index of 0007_query, and what this revision adds to it
COVERING = [
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
]
ADDED = ["src_key", "dst_key", "packets_weight", "bytes_weight"]
INDEX = "ix_reports_last_ms_covering"
#: overflowd.store.models.WEIGHT_CAP and V6_KEY_BASE, as they were when this was written
CAP = "1e140"
V6_KEY_BASE = 1 << 48


def _sqlite_key(version: int, address: bytes) -> int:
    if version == 4:
        return int.from_bytes(address[12:15], "big")
    return V6_KEY_BASE | int.from_bytes(address[:6], "big")


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("src_key", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("dst_key", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("packets_weight", sa.Double(), nullable=True))
        batch.add_column(sa.Column("bytes_weight", sa.Double(), nullable=True))
    if sqlite:
        # SQLite has no function that reads a blob's bytes as a number: Python's, on this
        # connection only, for this statement
        raw = bind.connection.driver_connection
        assert raw is not None
        raw.create_function("overflowd_prefix_key", 2, _sqlite_key, deterministic=True)
        src = "overflowd_prefix_key(ip_version, src)"
        dst = "overflowd_prefix_key(ip_version, dst)"
        inf = "9e999"
    else:

        def key(column: str) -> str:
            v4 = " | ".join(
                f"(get_byte({column}, {12 + i})::bigint << {16 - 8 * i})" for i in range(3)
            )
            v6 = " | ".join(f"(get_byte({column}, {i})::bigint << {40 - 8 * i})" for i in range(6))
            return f"CASE WHEN ip_version = 4 THEN {v4} ELSE {V6_KEY_BASE} | {v6} END"

        src, dst, inf = key("src"), key("dst"), "'Infinity'::float8"

    def weight(amount: str) -> str:
        # the same floating-point operations as models.report_weight and the query's SQL
        scaled = f"CAST({amount} AS DOUBLE PRECISION) * CAST(sampling_interval AS DOUBLE PRECISION)"
        return (
            f"CASE WHEN probability < 1.0 THEN CASE WHEN {scaled} > probability * {CAP} "
            f"THEN {inf} ELSE {scaled} / probability END END"
        )

    # the index is rebuilt with the new columns anyway: not kept up to date row by row meanwhile
    op.drop_index(INDEX, table_name="reports")
    op.execute(
        f"UPDATE reports SET src_key = {src}, dst_key = {dst}, "
        f"packets_weight = {weight('packets')}, bytes_weight = {weight('bytes')}"
    )
    op.create_index(INDEX, "reports", COVERING + ADDED)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="reports")
    op.create_index(INDEX, "reports", COVERING)
    with op.batch_alter_table("reports") as batch:
        for column in reversed(ADDED):
            batch.drop_column(column)
