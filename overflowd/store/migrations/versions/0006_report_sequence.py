"""Report sequence numbers: each stored report's own local, strictly increasing cursor.

Reports already stored are numbered in the order they were received (ties by id), and the
counter starts after the last of them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "report_sequence",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("last", sa.BigInteger(), nullable=False),
    )
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
    # UPDATE ... FROM: SQLite 3.33 and PostgreSQL alike; one pass, not a count per row.
    op.execute(
        "UPDATE reports SET seq = numbered.n FROM "
        "(SELECT id, ROW_NUMBER() OVER (ORDER BY received_ms, id) AS n FROM reports) AS numbered "
        "WHERE numbered.id = reports.id"
    )
    op.execute(
        "INSERT INTO report_sequence (name, last) "
        "SELECT 'reports', COALESCE(MAX(seq), 0) FROM reports"
    )
    with op.batch_alter_table("reports") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch.create_unique_constraint("uq_reports_seq", ["seq"])


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_constraint("uq_reports_seq", type_="unique")
        batch.drop_column("seq")
    op.drop_table("report_sequence")
