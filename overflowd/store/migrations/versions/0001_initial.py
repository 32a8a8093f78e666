"""Initial schema: the reports and the observers that signed them.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("cose", sa.LargeBinary(), nullable=False),
        sa.Column("observer_key", sa.LargeBinary(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("ip_version", sa.Integer(), nullable=False),
        sa.Column("src", sa.LargeBinary(16), nullable=False),
        sa.Column("dst", sa.LargeBinary(16), nullable=False),
        sa.Column("proto", sa.Integer(), nullable=False),
        sa.Column("sport", sa.Integer(), nullable=False),
        sa.Column("dport", sa.Integer(), nullable=False),
        sa.Column("packets", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("first_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_ms", sa.BigInteger(), nullable=False),
        sa.Column("tcp_flags", sa.Integer(), nullable=False),
        sa.Column("tos", sa.Integer(), nullable=False),
        sa.Column("src_as", sa.BigInteger(), nullable=True),
        sa.Column("dst_as", sa.BigInteger(), nullable=True),
        sa.Column("report_time_ms", sa.BigInteger(), nullable=False),
        sa.Column("probability", sa.Double(), nullable=False),
        sa.Column("sampling_format", sa.String(24), nullable=False),
        sa.Column("sampling_interval", sa.BigInteger(), nullable=False),
        sa.Column("sampling_provenance", sa.String(16), nullable=False),
        sa.Column("received_ms", sa.BigInteger(), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reports"),
    )
    op.create_index("ix_reports_observer_key", "reports", ["observer_key"])
    op.create_index("ix_reports_src", "reports", ["src"])
    op.create_index("ix_reports_dst", "reports", ["dst"])
    op.create_index("ix_reports_received_ms", "reports", ["received_ms"])

    op.create_table(
        "observers",
        sa.Column("key", sa.LargeBinary(32), nullable=False),
        sa.Column("fingerprint", sa.String(19), nullable=False),
        sa.Column("contacts", sa.Text(), nullable=False),
        sa.Column("point", sa.String(64), nullable=False),
        sa.Column("first_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("reports", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_observers"),
    )


def downgrade() -> None:
    op.drop_table("observers")
    op.drop_index("ix_reports_received_ms", table_name="reports")
    op.drop_index("ix_reports_dst", table_name="reports")
    op.drop_index("ix_reports_src", table_name="reports")
    op.drop_index("ix_reports_observer_key", table_name="reports")
    op.drop_table("reports")
